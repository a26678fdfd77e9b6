"""A restarted job reuses the tokenisation cache and the stored support instead of recomputing them."""

import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.distributed.launch import TINY_RUN


def _run(out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "dsee_dist.train",
        "--config",
        "configs/quickstart.yaml",
        f"output.dir={out}",
        *TINY_RUN,
        "train.max_steps=2",
        "train.micro_batch_size=8",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_restart_reuses_cache_and_support_and_refuses_changed_support_settings(tmp_path):
    out = tmp_path / "run"
    first = _run(out)
    assert "data: tokenising" in first and "support (decomposition): 4/4 matrices" in first
    support = load_file(str(out / "support.safetensors"))
    second = _run(out)
    assert "using cached tokenisation" in second and "support: reusing" in second
    assert "data: tokenising" not in second and "support (decomposition):" not in second
    again = load_file(str(out / "support.safetensors"))
    assert all(torch.equal(support[k], again[k]) for k in support)
    # A different N would need a different support: refused, naming the differing setting.
    cmd = [
        sys.executable,
        "-m",
        "dsee_dist.train",
        "--config",
        "configs/quickstart.yaml",
        f"output.dir={out}",
        *TINY_RUN,
        "train.max_steps=2",
        "dsee.num_sparse=8",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "computed with different settings (num_sparse)" in proc.stderr
