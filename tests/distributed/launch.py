"""Launching real training jobs for the distributed tests (real ranks, gloo on CPU).

Two ways to start ranks:
- `launcher="deepspeed"`: the `deepspeed` launcher, as users run it (dsee_dist.engine.launcher). The launcher
  itself is tested there (test_parity, test_quickstart, the SIGUSR1 test, tests/cluster for multi-node).
- `launcher="env"` (default): the ranks are started directly by the test, with the environment every launcher
  gives them (MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE), as torchrun or srun do. The
  training program is the same; what is saved is the ~7 s the deepspeed runner and its per-node launcher spend
  importing DeepSpeed before any rank starts, on each of the suite's many launches.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsee_dist.engine.launcher import free_port, launch_env, training_command  # noqa: F401 - free_port for tests
from tests.conftest import REPO

TINY_RUN = [
    "model.builtin=gpt2-tiny",
    "model.tokenizer_vocab_size=400",
    "model.dropout=0.0",
    "data.synthetic_train_examples=256",
    "data.synthetic_eval_examples=24",
    "data.block_size=64",
    "dsee.lora_rank=4",
    "dsee.lora_alpha=8",
    "dsee.num_sparse=16",
    "train.max_steps=6",
    "train.micro_batch_size=4",
    "train.lr=1e-2",
    "train.warmup_steps=0",
    "train.log_every_n_steps=1",
    "eval.every_n_steps=3",
    "eval.micro_batch_size=4",
]


def train_args(out_dir: Path, *overrides: str, config: str = "configs/quickstart.yaml") -> list[str]:
    return ["--config", config, f"output.dir={out_dir}", *overrides]


def train_command(
    world_size: int, out_dir: Path, *overrides: str, config: str = "configs/quickstart.yaml"
) -> list[str]:
    """The user's command line: `python -m dsee_dist.train` for one rank, the deepspeed launcher for more."""
    return training_command(world_size, train_args(out_dir, *overrides, config=config))


def run_ranks(
    world_size: int,
    module_args: list[str],
    *,
    env: dict | None = None,
    timeout: int = 600,
    grace_s: float = 10.0,
) -> subprocess.CompletedProcess:
    """`python -m MODULE_ARGS` as `world_size` ranks on this host, started directly with the launcher
    environment; like torchrun, the others are stopped `grace_s` after one rank fails. Returns the ranks'
    output concatenated in rank order and the first non-zero exit status (0 when all succeed)."""
    base_env = launch_env(env)
    base_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size))
    base_env.update(LOCAL_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), CROSS_RANK="0", CROSS_SIZE="1")
    with tempfile.TemporaryDirectory(prefix="dsee-ranks-") as logs:
        procs, files = [], []
        for rank in range(world_size):
            out = open(Path(logs) / f"{rank}.out", "w+")
            err = open(Path(logs) / f"{rank}.err", "w+")
            files.append((out, err))
            rank_env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            procs.append(
                subprocess.Popen([sys.executable, "-m", *module_args], cwd=REPO, env=rank_env, stdout=out, stderr=err)
            )
        deadline, failed_at = time.time() + timeout, None
        try:
            while any(p.poll() is None for p in procs):
                now = time.time()
                if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                    failed_at = now
                if now > deadline or (failed_at is not None and now - failed_at > grace_s):
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
                    if now > deadline:
                        raise subprocess.TimeoutExpired(module_args, timeout, output=_read(files, 0))
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        codes = [p.returncode for p in procs]
        code = next((c for c in codes if c != 0), 0)
        return subprocess.CompletedProcess(module_args, code, stdout=_read(files, 0), stderr=_read(files, 1))


def _read(files, which: int) -> str:
    texts = []
    for pair in files:
        pair[which].flush()
        pair[which].seek(0)
        texts.append(pair[which].read())
    return "".join(texts)


def run_module(
    world_size: int, module_args: list[str], *, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python -m MODULE_ARGS` as one process, or as `world_size` ranks started directly (run_ranks)."""
    if world_size > 1:
        return run_ranks(world_size, module_args, env=env, timeout=timeout)
    return subprocess.run(
        [sys.executable, "-m", *module_args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=launch_env(env),
    )


def launch_training(
    world_size: int,
    out_dir: Path,
    *overrides: str,
    launcher: str = "env",
    env: dict | None = None,
    timeout: int = 600,
    config: str = "configs/quickstart.yaml",
) -> subprocess.CompletedProcess:
    """One training job; its exit status is the caller's to check."""
    args = train_args(out_dir, *overrides, config=config)
    if world_size > 1 and launcher != "env":
        return subprocess.run(
            training_command(world_size, args),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=launch_env(env),
        )
    return run_module(world_size, ["dsee_dist.train", *args], env=env, timeout=timeout)


def _must_succeed(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_training(world_size: int, out_dir: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    """One training job that must succeed (its output is shown when it does not)."""
    return _must_succeed(launch_training(world_size, out_dir, *overrides, **kw))


def run_jobs_in_one_launch(
    world_size: int,
    jobs: dict[str, tuple[Path, list[str]]],
    *,
    timeout: int = 600,
    config: str = "configs/quickstart.yaml",
) -> dict[str, str]:
    """Several training jobs (name -> (output dir, overrides)) run one after another by the same ranks
    (tests/distributed/sequential_jobs.py), paying their start-up once; all must succeed. Returns each job's
    rank-0 output, each checked to report the ZeRO stage of its own `deepspeed.config` (a job never runs under
    the previous job's engine)."""
    from tests.distributed.sequential_jobs import JOB_MARKER

    with tempfile.TemporaryDirectory(prefix="dsee-jobs-") as tmp:
        jobs_file = Path(tmp) / "jobs.json"
        argvs = [[name, train_args(out, *overrides, config=config)] for name, (out, overrides) in jobs.items()]
        jobs_file.write_text(json.dumps(argvs, default=str))
        proc = _must_succeed(
            run_module(world_size, ["tests.distributed.sequential_jobs", str(jobs_file)], timeout=timeout)
        )
    # rank 0's output comes first (run_ranks joins the ranks' outputs in rank order)
    parts = proc.stdout.split(JOB_MARKER)[1 : len(jobs) + 1]
    outputs = {part.split("\n", 1)[0]: part for part in parts}
    assert list(outputs) == list(jobs), proc.stdout[-3000:]
    for name, (_, overrides) in jobs.items():
        engine = [o.split("=", 1)[1] for o in overrides if o.startswith("deepspeed.config=")]
        assert engine, f"job {name}: give deepspeed.config explicitly (its ZeRO stage is checked)"
        stage = json.loads((REPO / engine[-1]).read_text())["zero_optimization"]["stage"]
        assert f"ZeRO stage {stage}" in outputs[name], f"job {name} did not run under {engine[-1]}"
    return outputs


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out_dir) if "loss" in row]
