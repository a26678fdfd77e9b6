"""Shared by the benchmarks: run one worker script as a real multi-rank `deepspeed` job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_worker(script: str, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS bench/SCRIPT ARGS` on a free port, output captured."""
    from dsee_dist.engine.launcher import deepspeed_command, launch_env  # imports DeepSpeed: only when launching

    cmd = deepspeed_command(ranks, [str(ROOT / "bench" / script), *args])
    return subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=ROOT)


def device_kind(requested: str, script: str, gpu_run: str, cpu_hint: str = "--device cpu", **skip_info) -> str | None:
    """'gpu' or 'cpu' for --device auto|cpu|gpu; None, after one line saying so and the skip JSON (with
    `skip_info` added), when a GPU is asked for and there is none (`gpu_run` names what was skipped,
    `cpu_hint` the option that gives the CPU figures instead)."""
    import json

    import torch

    has_gpu = torch.cuda.is_available()
    if requested == "gpu" and not has_gpu:
        print(
            f"bench/{script}: no CUDA GPU on this machine: {gpu_run} was skipped; run with {cpu_hint} for the CPU "
            f"figures"
        )
        print(json.dumps({"skipped": "no GPU", **skip_info}))
        return None
    return ("gpu" if has_gpu else "cpu") if requested == "auto" else requested
