"""bench/dsee_layer.py on CPU: every variant of the adapted projection is timed for every shape, the folded and
the layer's own sparse update agree (checked by the bench before timing), and the GPU path says in one line that
it was skipped when there is no GPU."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "dsee_layer.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_variant_is_timed_against_lora():
    proc = run_bench("--device", "cpu", "--tokens", "32", "--iters", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and len(result["shapes"]) == 3
    for variants in result["shapes"].values():
        assert list(variants) == ["lora", "dsee-lowrank", "dsee", "dsee-folded", "dsee-dense"]
        assert variants["lora"]["over_lora"] == 1.0
        for timing in variants.values():
            assert timing["ms"] > 0
            assert timing["over_lora"] == pytest.approx(timing["ms"] / variants["lora"]["ms"], abs=2e-3)


def test_folded_update_equals_the_layer():
    sys.path.insert(0, str(REPO / "bench"))
    import argparse

    import torch
    from dsee_layer import check_folded_equals_layer

    args = argparse.Namespace(rank=4, num_sparse=16)
    check_folded_equals_layer(96, 40, [(0, 32), (64, 32)], args, torch.device("cpu"), torch.float32)


def test_gpu_path_without_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_bench("--device", "gpu")
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 2 and "skipped" in lines[0]
