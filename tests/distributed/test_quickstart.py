"""The README's main job (`dsee-dist quickstart`): 2 ranks, ZeRO-3, built-in model and data."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.distributed.launch import free_port, read_metrics

pytestmark = pytest.mark.distributed


def test_quickstart_runs_learns_and_writes_its_outputs(tmp_path):
    out = tmp_path / "qs"
    # The shipped config, shortened to 60 steps; everything else (model, data, ZeRO-3, 2 ranks) as users run it.
    cmd = [
        sys.executable,
        "-m",
        "dsee_dist",
        "quickstart",
        "--tiny",
        "--master_port",
        str(free_port()),
        "--output-dir",
        str(out),
        "train.max_steps=60",
        "eval.every_n_steps=30",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(losses) == 12 and all(("lr" in r and "step" in r) for r in rows if "loss" in r)
    assert losses[-1] < losses[0] - 0.2 and evals[-1] < evals[0]
    assert "ZeRO stage 3" in proc.stdout and "world size 2" in proc.stdout
    assert proc.stderr.count("train:   0%") == 1  # one progress bar (rank 0 only): each bar renders 0% once
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["num_sparse"] == 64 and len(config["layers"]) == 4
    assert (out / "support.safetensors").is_file() and (out / "config.resolved.yaml").is_file()
