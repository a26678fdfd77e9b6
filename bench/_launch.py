"""Shared by the benchmarks: run one worker script as a real multi-rank `deepspeed` job, end a worker's rank the
way the trainer's ranks end, and record what every results/*.json carries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_worker(script: str, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS bench/SCRIPT ARGS` on a free port, output captured."""
    from dsee_dist.engine.launcher import deepspeed_command, launch_env  # imports DeepSpeed: only when launching

    cmd = deepspeed_command(ranks, [str(ROOT / "bench" / script), *args])
    return subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=ROOT)


def end_rank(code: int = 0) -> NoReturn:
    """End a worker rank as `python -m dsee_dist.train` ends its ranks: the process group destroyed, then
    `exit_process` (streams flushed, no interpreter teardown). Returning from main instead lets gloo's background
    threads abort a finished rank at exit ("terminate called without an active exception", status 250), and the
    launcher then reports the finished job as failed."""
    from dsee_dist.engine import distributed
    from dsee_dist.recipes.finetune import exit_process  # on main it lives here (issue 40 moves it to engine/)

    distributed.shutdown()
    exit_process(code)


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


def run_info(device: str) -> dict:
    """What every results/*.json carries: date (UTC), commit (+dirty), package versions, the device in words."""
    import datetime
    import importlib.metadata as md
    import os
    import platform

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "deepspeed", "peft"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        commit = commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        commit = None
    if device == "gpu":
        import torch

        name = f"{torch.cuda.get_device_name(0)} (1 GPU)"
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "versions": versions,
        "device_name": name,
    }


def write_result(path, payload: dict, device: str) -> None:
    """`payload` plus run_info(device) as indented JSON at `path` (folders created)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**run_info(device), **payload}, indent=1) + "\n")
