"""Every shipped DeepSpeed JSON trains: ZeRO-1, bf16 and CPU-offload variants track the fp32 losses. The jobs run
one after another in the same two ranks (tests/distributed/sequential_jobs.py)."""

import pytest

from tests.conftest import REPO
from tests.distributed.launch import TINY_RUN, run_jobs_in_one_launch, train_losses

pytestmark = pytest.mark.distributed

COVERED_ELSEWHERE = {"zero0_fp32.json", "zero2_fp32.json", "zero3_fp32.json"}  # test_parity.py
CONFIGS = sorted(p.name for p in (REPO / "configs" / "ds").glob("*.json") if p.name not in COVERED_ELSEWHERE)
SHORT = [*TINY_RUN, "train.max_steps=3", "eval.every_n_steps=0", "eval.max_batches=1"]
REFERENCE = "zero2_fp32.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_configs")
    jobs = {name: (root / name, [*SHORT, f"deepspeed.config=configs/ds/{name}"]) for name in [REFERENCE, *CONFIGS]}
    outputs = run_jobs_in_one_launch(2, jobs)
    return {name: (train_losses(root / name), outputs[name]) for name in jobs}


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_engine_config_trains(name, runs):
    reference, _ = runs[REFERENCE]
    losses, output = runs[name]
    assert len(losses) == 3 and reference[-1] < reference[0]
    assert ("torch.bfloat16" in output) == ("bf16" in name)
    tolerance = 2e-2 if "bf16" in name else 1e-5  # bf16 weights and activations round at ~3 digits
    assert losses == pytest.approx(reference, rel=tolerance)
