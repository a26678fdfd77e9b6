"""bench/dsee_layer.py on CPU: every variant of the adapted projection (DSEE's paths, PEFT's LoRA, Supra and SHiRA)
is timed for every shape, the folded and the fused sparse updates agree with the layer's own (checked by the bench
before timing), the SmolLM2 shapes carry PEFT's layers at the recipes' budgets, and the GPU path says in one line
that it was skipped when there is no GPU."""

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
        # dsee-compiled is timed where torch.compile works on this machine, and named under not_timed otherwise
        assert [v for v in variants if v != "dsee-compiled"] == [
            "lora", "dsee-lowrank", "dsee", "dsee-folded", "dsee-dense", "dsee-fused", "supra", "shira",
        ]  # fmt: skip
        assert variants["lora"]["over_lora"] == 1.0
        for timing in variants.values():
            assert timing["ms"] > 0
            assert timing["over_lora"] == pytest.approx(timing["ms"] / variants["lora"]["ms"], rel=2e-3, abs=2e-3)


def test_smollm2_shapes_write_a_result_file_with_the_profile(tmp_path):
    out = tmp_path / "layer.json"
    proc = run_bench(
        "--device", "cpu", "--shapes", "smollm2", "--tokens", "16", "--iters", "2", "--threads", "1",
        "--variants", "dsee,dsee-fused,supra,shira", "--profile", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rank"] == 8 and result["num_sparse"] == 384 and result["threads"] == 1
    assert {"date", "commit", "versions", "device_name"} <= set(result)
    assert list(result["shapes"]) == ["smollm2-135m q_proj 576x576", "smollm2-135m v_proj 192x576"]
    for name, variants in result["shapes"].items():
        assert list(variants) == ["lora", "dsee", "dsee-fused", "supra", "shira"]
        assert set(result["profile"][name]) == {"lora", "dsee", "dsee-fused"}  # those asked for
        lo, hi = result["over_lora_p10_p90"][name]["dsee"]
        assert 0 < lo <= hi


def test_peft_layers_hold_the_recipes_budgets():
    sys.path.insert(0, str(REPO / "bench"))
    import argparse

    import torch
    from dsee_layer import build

    args = argparse.Namespace(rank=8, num_sparse=384)
    for out_f in (576, 192):
        _, dsee = build("dsee", out_f, 576, None, args, torch.device("cpu"), torch.float32)
        _, supra = build("supra", out_f, 576, None, args, torch.device("cpu"), torch.float32)
        _, shira = build("shira", out_f, 576, None, args, torch.device("cpu"), torch.float32)
        count = lambda params: sum(p.numel() for p in params)  # noqa: E731
        assert count(supra) == count(dsee) == 8 * (576 + out_f) + 384  # r(in + out) + N, one matrix
        assert count(shira) == 8 * (576 + out_f)  # LoRA's count


def test_fused_update_equals_the_layer_bitwise():
    sys.path.insert(0, str(REPO / "bench"))
    import argparse

    import torch
    from dsee_layer import check_fused_equals_layer

    args = argparse.Namespace(rank=4, num_sparse=16)
    check_fused_equals_layer(96, 40, [(0, 32), (64, 32)], args, torch.device("cpu"))


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
