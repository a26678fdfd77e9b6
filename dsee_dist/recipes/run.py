"""The training command: one config, fine-tuning alone (recipes/finetune.py) or, with `prune.method` set, the
two-stage recipe (recipes/two_stage.py: tune, prune, re-tune, export).

    python -m dsee_dist.train --config configs/quickstart.yaml [section.key=value ...]
    deepspeed --num_gpus 2 --module dsee_dist.train --config ...   # or torchrun, or srun
    dsee-dist train --config ...                                   # in this process
"""

from __future__ import annotations

import argparse
import warnings

from dsee_dist.config import load_config
from dsee_dist.engine import process_group
from dsee_dist.engine.preemption import PreemptionHandler
from dsee_dist.engine.process_exit import reports_errors
from dsee_dist.recipes import finetune, two_stage
from dsee_dist.utils.log import setup_logging

# how the launchers start this command; `dsee-dist train` passes its own name for usage lines
LAUNCHER_PROG = "python -m dsee_dist.train"


def parse_args(argv: list[str] | None, prog: str = LAUNCHER_PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. configs/quickstart.yaml)")
    # appended by the deepspeed launcher
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides: train.max_steps=20 ds.zero_optimization.stage=2"
    )
    return parser.parse_args(argv)


@reports_errors("dsee_dist")
def main(argv: list[str] | None = None, prog: str = LAUNCHER_PROG) -> int:
    """The run's exit status: 0 when finished, PREEMPTED_EXIT_CODE after a preemption's checkpoint."""
    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per step.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    setup_logging()
    args = parse_args(argv, prog)
    cfg = load_config(args.config, args.overrides)
    preemption = PreemptionHandler()
    try:
        ctx = finetune.setup_run(cfg, preemption)
        if cfg.prune.method == "none":
            code, _ = finetune.train(cfg, ctx.out_dir, ctx.base_model, ctx)
        else:
            code, _ = two_stage.tune_prune_retune(cfg, ctx)
    finally:
        if not preemption.requested:  # preempted: signals stay ignored, so teardown keeps the documented status
            preemption.restore()
    process_group.shutdown()
    return code
