"""Launcher entry point for training: `python -m dsee_dist.train --config X.yaml [section.key=value ...]`,
also under `deepspeed --module dsee_dist.train`, `torchrun -m dsee_dist.train` and srun.

The command is `dsee_dist.recipes.run` (fine-tuning, or the two-stage recipe when prune.method is set).
"""

from dsee_dist.engine.process_exit import exit_process
from dsee_dist.recipes.run import main

if __name__ == "__main__":
    exit_process(main())
