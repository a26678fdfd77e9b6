"""Launching real training jobs for the distributed tests (deepspeed launcher, gloo on CPU)."""

import json
import subprocess
from pathlib import Path

from dsee_dist.engine.launcher import free_port, training_command  # noqa: F401 - free_port for the tests
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


def train_command(
    world_size: int, out_dir: Path, *overrides: str, config: str = "configs/quickstart.yaml"
) -> list[str]:
    return training_command(world_size, ["--config", config, f"output.dir={out_dir}", *overrides])


def run_training(
    world_size: int, out_dir: Path, *overrides: str, timeout: int = 600, config: str = "configs/quickstart.yaml"
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_command(world_size, out_dir, *overrides, config=config),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out_dir) if "loss" in row]
