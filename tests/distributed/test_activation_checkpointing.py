"""train.activation_checkpointing with DSEE layers under ZeRO-2 and ZeRO-3 (and the chunked loss,
train.loss_chunk_tokens, under ZeRO-2), 2 real gloo ranks: the losses equal those of the plain run (the parity tests
show ZeRO-2 == ZeRO-3); the chunked loss under ZeRO-3 is refused before training."""

import pytest

from tests.distributed.launch import TINY_RUN, read_metrics, run_training, train_losses

pytestmark = pytest.mark.distributed

RUNS = {
    "zero2_plain": ("configs/ds/zero2_fp32.json", []),
    "zero2_checkpointed_chunked": (
        "configs/ds/zero2_fp32.json",
        ["train.activation_checkpointing=true", "train.loss_chunk_tokens=37"],
    ),
    "zero3_checkpointed": ("configs/ds/zero3_fp32.json", ["train.activation_checkpointing=true"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("activation_checkpointing")
    for name, (ds, extra) in RUNS.items():
        run_training(
            2, root / name, *TINY_RUN, "train.max_steps=3", "eval.every_n_steps=0", f"deepspeed.config={ds}", *extra
        )
    return root


def test_checkpointed_losses_equal_plain_under_zero2_and_zero3(runs):
    reference = train_losses(runs / "zero2_plain")
    assert len(reference) == 3 and reference[-1] < reference[0]  # it learns, so the updates are compared too
    for name in ("zero2_checkpointed_chunked", "zero3_checkpointed"):
        assert train_losses(runs / name) == pytest.approx(reference, rel=1e-5, abs=1e-6), name
    final = [row["eval_loss"] for name in RUNS for row in read_metrics(runs / name) if "eval_loss" in row]
    assert final == pytest.approx([final[0]] * len(RUNS), rel=1e-5)


def test_chunked_loss_under_zero3_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsee_dist.train",
            "--config",
            "configs/quickstart.yaml",
            f"output.dir={tmp_path}",
            *TINY_RUN,
            "train.loss_chunk_tokens=64",
            "deepspeed.config=configs/ds/zero3_fp32.json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "train.loss_chunk_tokens" in errors[0] and "ZeRO-3" in errors[0]
