"""Shared by the benchmarks: run one worker script as a real multi-rank `deepspeed` job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsee_dist.engine.distributed import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_worker(script: str, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS bench/SCRIPT ARGS` on a free port, output captured."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dsee_dist" / "torch_extensions"))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(ROOT / "bench" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
