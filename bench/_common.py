"""The benchmarks' shared helpers, in one place:

- launching: `run_worker` runs a bench worker script as a real multi-rank `deepspeed` job, `worker_result` also
  checks it and reads the JSON it wrote; `end_rank` ends a worker's rank the way the trainer's ranks end;
  `run_with_usage` runs a child (a trainer) and reads its own CPU time and peak RSS from the kernel;
- comparing: `alternating` (the launch order of methods over repeats), `keep_lowest` (each method's best
  repeat), `quantile`, `spread` (median and range of per-repeat ratios), `exact_generate_seconds` (greedy
  tokens/s at a fixed length);
- recording: `device_kind` (--device auto|cpu|gpu), `git_commit`, `package_versions`, `device_name`,
  `run_info` and `write_result` (what every results/*.json carries), `write_json` (atomic, as every bench writes
  its JSON).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUN_PACKAGES = ("torch", "transformers", "deepspeed", "peft")


# ------------------------------------------------------------------------------ launching


def run_worker(script: str, ranks: int, *args: str) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus RANKS bench/SCRIPT ARGS` on a free port, output captured."""
    from dsee_dist.engine.launcher import deepspeed_command, launch_env  # imports DeepSpeed: only when launching

    cmd = deepspeed_command(ranks, [str(ROOT / "bench" / script), *args])
    return subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=ROOT)


def worker_result(script: str, ranks: int, args: list, result: Path, failure: str, tries: int = 1) -> dict:
    """The JSON that `script` wrote to `result`, launched on `ranks` ranks (again, up to `tries` times, while it
    fails); exits with `failure` and the end of the worker's stderr when no launch succeeds."""
    for _ in range(tries):
        proc = run_worker(script, ranks, *[str(a) for a in args])
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text())
    sys.exit(f"{failure}:\n{proc.stderr[-3000:]}")


def run_with_usage(cmd: list[str], env: dict, log: Path, append: bool = False, on_pid=None) -> tuple[int, object]:
    """(exit status, the child's own resource usage from wait4: CPU seconds, peak RSS in KiB) of `cmd` run in the
    repository, its output written to (or, with `append`, added to) `log`. `on_pid` is called with the child's
    pid once it runs and with None once it has ended (e.g. to pass a stop request on to it)."""
    import os

    with open(log, "a" if append else "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        if on_pid is not None:
            on_pid(proc.pid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if on_pid is not None:
                on_pid(None)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def end_rank(code: int = 0) -> NoReturn:
    """End a worker rank as `python -m dsee_dist.train` ends its ranks: the process group destroyed, then
    `exit_process` (streams flushed, no interpreter teardown). Returning from main instead lets gloo's background
    threads abort a finished rank at exit ("terminate called without an active exception", status 250), and the
    launcher then reports the finished job as failed."""
    from dsee_dist.engine import process_group
    from dsee_dist.engine.process_exit import exit_process

    process_group.shutdown()
    exit_process(code)


# ------------------------------------------------------------------------------ comparing


def alternating(names: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, name) in launch order: the names forward in even repeats, backward in odd ones, so that drift on a
    shared machine does not favour whichever runs first."""
    return [(r, name) for r in range(repeats) for name in (names if r % 2 == 0 else names[::-1])]


def keep_lowest(best: dict, name: str, measured: dict, key: str = "median_step_s") -> None:
    """`best[name] = measured` unless `best` already holds a lower `key` for `name`."""
    if name not in best or measured[key] < best[name][key]:
        best[name] = measured


def quantile(values: list[float], q: float) -> float:
    """The `q` quantile of `values`, nearest rank (no interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> dict:
    """Median, min and max (3 decimals) of per-repeat ratios, and how many repeats gave one."""
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "repeats": len(values),
    }


def exact_generate_seconds(model, input_ids, attention_mask, new_tokens: int, pad_token_id: int) -> float:
    """Seconds of greedy `generate` (KV cache on) making exactly `new_tokens` per sequence: min = max, so no stop
    token ends it early and the time depends on the shapes, not the weights (unlike dsee_dist.eval.decoding's
    generate_texts, which stops at EOS or a newline). The device is synchronised before and after."""
    import time

    import torch

    sync = torch.cuda.synchronize if input_ids.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            num_beams=1,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad_token_id,
            use_cache=True,
        )
    sync()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return elapsed


# ------------------------------------------------------------------------------ recording


def device_kind(requested: str, script: str, gpu_run: str, cpu_hint: str = "--device cpu", **skip_info) -> str | None:
    """'gpu' or 'cpu' for --device auto|cpu|gpu; None, after one line saying so and the skip JSON (with
    `skip_info` added), when a GPU is asked for and there is none (`gpu_run` names what was skipped,
    `cpu_hint` the option that gives the CPU figures instead)."""
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


def git_commit() -> str | None:
    """HEAD of the repository, with "+dirty" when tracked files differ from it; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if changes else "")


def package_versions(packages=RUN_PACKAGES) -> dict:
    """Python's version and each installed package's (None where it is not installed)."""
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for pkg in packages:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return versions


def device_name(gpu: bool) -> str:
    """The first GPU's name, or the CPU's kind and core count."""
    import os
    import platform

    if gpu:
        import torch

        return f"{torch.cuda.get_device_name(0)} (1 GPU)"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def run_info(device: str) -> dict:
    """What every results/*.json carries: date (UTC), commit (+dirty), package versions, the device in words."""
    import datetime

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "versions": package_versions(),
        "device_name": device_name(device == "gpu"),
    }


def write_json(path, obj) -> None:
    """`obj` as indented JSON at `path`, atomically (dsee_dist.utils.files), folders created; values JSON does not
    know (paths) written as text."""
    from dsee_dist.utils.files import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


def write_result(path, payload: dict, device: str) -> None:
    """`payload` plus run_info(device) as indented JSON at `path` (folders created)."""
    write_json(path, {**run_info(device), **payload})
