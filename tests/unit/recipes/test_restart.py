"""A job preempted during its set-up exits with the preemption status; restarted, it reuses the
tokenisation cache and the stored support instead of recomputing them."""

import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.distributed.launch import TINY_RUN


def _command(out, *extra) -> list[str]:
    return [
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


def _run(out, *extra):
    proc = subprocess.run(_command(out, *extra), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _run_preempted_during_setup(out) -> str:
    """SIGTERM as soon as the job says it started (before its data, model and support): what a scheduler
    does to a job preempted early. Returns everything it printed; the job must exit with status 75."""
    proc = subprocess.Popen(_command(out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "world size 1" in line:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 75, "".join(lines)[-3000:]
    return "".join(lines)


def test_setup_preemption_then_restart_reuses_cache_and_support_and_refuses_changed_support_settings(tmp_path):
    out = tmp_path / "run"
    first = _run_preempted_during_setup(out)
    # the set-up completes (its results are cached), no step is trained, nothing is checkpointed
    assert "data: tokenising" in first and "support (decomposition): 4/4 matrices" in first
    assert "received SIGTERM" in first and "before training step 1, nothing to save" in first
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
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
