"""Shared by the benchmarks: run one worker script as a real multi-rank `deepspeed` job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsee_dist.engine.launcher import deepspeed_command, launch_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_worker(script: str, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS bench/SCRIPT ARGS` on a free port, output captured."""
    cmd = deepspeed_command(ranks, [str(ROOT / "bench" / script), *args])
    return subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=ROOT)
