"""bench/step_time.py: PEFT's Supra and SHiRA run beside LoRA through the same DeepSpeed worker, and `over_lora`
divides each method's step time and memory by lora's of the same repeat (median and range over repeats)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_over_lora_pairs_each_repeat_with_its_own_lora():
    sys.path.insert(0, str(REPO / "bench"))
    from step_time import over_lora

    launches = [
        {"repeat": 0, "method": "lora", "median_step_s": 1.0, "peak_rss_bytes": 100, "peak_gpu_bytes": None},
        {"repeat": 0, "method": "supra", "median_step_s": 1.2, "peak_rss_bytes": 110, "peak_gpu_bytes": None},
        {"repeat": 1, "method": "supra", "median_step_s": 3.3, "peak_rss_bytes": 120, "peak_gpu_bytes": None},
        {"repeat": 1, "method": "lora", "median_step_s": 3.0, "peak_rss_bytes": 100, "peak_gpu_bytes": None},
        {"repeat": 2, "method": "lora", "median_step_s": 2.0, "peak_rss_bytes": 100, "peak_gpu_bytes": None},
        {"repeat": 2, "method": "supra", "median_step_s": 2.6, "peak_rss_bytes": 130, "peak_gpu_bytes": None},
    ]
    ratios = over_lora(launches, ["lora", "supra"])
    assert ratios["supra"]["step_time"] == {"median": 1.2, "min": 1.1, "max": 1.3, "repeats": 3}
    assert ratios["supra"]["peak_rss"] == {"median": 1.2, "min": 1.1, "max": 1.3, "repeats": 3}
    assert "peak_gpu" not in ratios["supra"]  # not measured on CPU
    assert ratios["lora"]["step_time"]["median"] == 1.0


def test_supra_and_shira_run_beside_lora(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "bench" / "step_time.py"), "--device", "cpu", "--family", "llama",
            "--n-layer", "1", "--n-embd", "32", "--n-head", "4", "--n-kv-head", "2", "--intermediate", "64",
            "--vocab", "128", "--seq", "8", "--micro-batch", "1", "--ranks", "1", "--threads", "1", "--stages", "2",
            "--methods", "lora,supra,shira", "--repeats", "1", "--steps", "2", "--num-sparse", "8", "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    stage = result["per_stage"]["zero2"]
    assert set(stage["over_lora"]) == {"lora", "supra", "shira"}
    assert "dsee_over_lora" not in result  # dsee did not run
    # supra: LoRA's count plus 8 sparse entries per matrix (q_proj 32x32, v_proj 16x32: one sparsity for both)
    lora = stage["trainable"]["lora"]
    assert stage["trainable"]["supra"] == lora + 2 * 8 and stage["trainable"]["shira"] == lora
    for method in ("supra", "shira"):
        assert stage["over_lora"][method]["step_time"]["median"] > 0
        assert stage["over_lora"][method]["peak_rss"]["median"] == pytest.approx(1.0, abs=0.5)
    assert result["threads_per_rank"] == 1 and {"date", "commit", "versions"} <= set(result)
