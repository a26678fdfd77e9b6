"""bench/train_loop.py on CPU with a small random Llama: the trainer (dsee) and the plain PEFT loop each
time the asked number of steps on unpadded batches, and the ratios are those of the medians; without a GPU, its
GPU path says in one line that it was skipped."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "train_loop.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_trainer_and_plain_loop_are_timed_side_by_side():
    # one trainer method (each is one more trainer launch; the methods share every line of the timing)
    proc = run_bench(
        "--device", "cpu", "--layers", "2", "--hidden", "64", "--steps", "3", "--warmup", "1", "--repeats", "1",
        "--methods", "dsee",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    loops = result["loops"]
    assert set(loops) == {"plain", "dsee"} and result["repeats"] == 1
    assert all(
        loop["steps"] == 3 and loop["median_step_s"] > 0 and loop["p90_over_median"] >= 1 for loop in loops.values()
    )
    ratio = loops["dsee"]["median_step_s"] / loops["plain"]["median_step_s"]
    assert set(result["trainer_over_plain"]) == {"dsee"}
    assert result["trainer_over_plain"]["dsee"] == pytest.approx(ratio, abs=1e-3)


def test_gpu_path_without_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_bench("--device", "gpu")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and "skipped" in lines[0] and json.loads(lines[1]) == {"skipped": "no GPU"}


def test_supra_and_shira_trainers_are_compared_with_lora(tmp_path):
    out = tmp_path / "loop.json"
    proc = run_bench(
        "--device", "cpu", "--layers", "1", "--hidden", "64", "--steps", "2", "--warmup", "1", "--repeats", "1",
        "--methods", "lora,supra,shira", "--threads", "1", "--num-sparse", "8", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["loops"]) == {"plain", "lora", "supra", "shira"}
    assert set(result["over_lora"]) == {"lora", "supra", "shira"}
    for method in ("supra", "shira"):
        ratios = result["over_lora"][method]
        run = result["per_repeat"][0]
        assert ratios["step_time"]["median"] == pytest.approx(
            run[method]["median_step_s"] / run["lora"]["median_step_s"], abs=1e-3
        )
        assert run[method]["peak_rss_bytes"] > 100 * 2**20  # a whole trainer process: torch, DeepSpeed, the model
        assert ratios["peak_rss"]["median"] == pytest.approx(1.0, abs=0.5)
    assert {"date", "commit", "versions", "device_name"} <= set(result)
