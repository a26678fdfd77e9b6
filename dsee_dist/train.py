"""Launcher entry point for training: `python -m dsee_dist.train --config X.yaml [section.key=value ...]`,
also under `deepspeed --module dsee_dist.train`, `torchrun -m dsee_dist.train` and srun.

The run itself is the recipe in `dsee_dist.recipes.finetune`.
"""

from dsee_dist.recipes.finetune import exit_process, run

if __name__ == "__main__":
    exit_process(run())
