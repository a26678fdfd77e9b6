"""Every shipped DeepSpeed JSON trains: ZeRO-1, bf16 and CPU-offload variants track the fp32 losses."""

import pytest

from tests.conftest import REPO
from tests.distributed.launch import TINY_RUN, run_training, train_losses

pytestmark = pytest.mark.distributed

COVERED_ELSEWHERE = {"zero0_fp32.json", "zero2_fp32.json", "zero3_fp32.json"}  # test_parity.py
CONFIGS = sorted(p.name for p in (REPO / "configs" / "ds").glob("*.json") if p.name not in COVERED_ELSEWHERE)
SHORT = [*TINY_RUN, "train.max_steps=3", "eval.every_n_steps=0", "eval.max_batches=1"]


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "run"
    run_training(2, out, *SHORT, "deepspeed.config=configs/ds/zero2_fp32.json")
    return train_losses(out)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_engine_config_trains(name, fp32_losses, tmp_path):
    proc = run_training(2, tmp_path / "run", *SHORT, f"deepspeed.config=configs/ds/{name}")
    losses = train_losses(tmp_path / "run")
    assert ("torch.bfloat16" in proc.stdout) == ("bf16" in name)
    tolerance = 2e-2 if "bf16" in name else 1e-5  # bf16 weights and activations round at ~3 digits
    assert losses == pytest.approx(fp32_losses, rel=tolerance)
