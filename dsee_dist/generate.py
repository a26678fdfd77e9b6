"""Launcher entry point for generation: `python -m dsee_dist.generate MODEL --input X --output Y`, also under
`deepspeed --num_gpus N --module dsee_dist.generate` and torchrun. The command is `dsee_dist.recipes.generate`."""

from dsee_dist.engine.process_exit import exit_process
from dsee_dist.recipes.generate import main

if __name__ == "__main__":
    exit_process(main())
