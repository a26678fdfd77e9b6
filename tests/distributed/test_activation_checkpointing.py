"""train.activation_checkpointing with DSEE layers under ZeRO-2 and ZeRO-3 and the chunked loss
(train.loss_chunk_tokens) under both, 2 real gloo ranks: the losses equal those of the plain run (the parity tests
show ZeRO-2 == ZeRO-3), also for full fine-tuning, whose LM head (tied to the partitioned embedding under ZeRO-3)
gets its gradient from the chunked loss."""

import pytest

from tests.distributed.launch import TINY_RUN, read_metrics, run_jobs_in_one_launch, train_losses

pytestmark = pytest.mark.distributed

RUNS = {
    "zero2_plain": ("configs/ds/zero2_fp32.json", []),
    "zero2_checkpointed_chunked": (
        "configs/ds/zero2_fp32.json",
        ["train.activation_checkpointing=true", "train.loss_chunk_tokens=37"],
    ),
    "zero3_checkpointed_chunked": (
        "configs/ds/zero3_fp32.json",
        ["train.activation_checkpointing=true", "train.loss_chunk_tokens=37"],
    ),
    "full_zero2_plain": ("configs/ds/zero2_fp32.json", ["method=full"]),
    "full_zero3_chunked": ("configs/ds/zero3_fp32.json", ["method=full", "train.loss_chunk_tokens=37"]),
}
DSEE_RUNS = ("zero2_plain", "zero2_checkpointed_chunked", "zero3_checkpointed_chunked")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The five jobs one after another in the same two ranks (tests/distributed/sequential_jobs.py)."""
    root = tmp_path_factory.mktemp("activation_checkpointing")
    jobs = {
        name: (root / name, [*TINY_RUN, "train.max_steps=3", "eval.every_n_steps=0", f"deepspeed.config={ds}", *extra])
        for name, (ds, extra) in RUNS.items()
    }
    run_jobs_in_one_launch(2, jobs)  # checks that each job ran under its own engine config
    return root


def test_checkpointed_and_chunked_losses_equal_plain_under_zero2_and_zero3(runs):
    reference = train_losses(runs / "zero2_plain")
    assert len(reference) == 3 and reference[-1] < reference[0]  # it learns, so the updates are compared too
    for name in DSEE_RUNS[1:]:
        assert train_losses(runs / name) == pytest.approx(reference, rel=1e-5, abs=1e-6), name
    final = [row["eval_loss"] for name in DSEE_RUNS for row in read_metrics(runs / name) if "eval_loss" in row]
    assert len(final) == len(DSEE_RUNS) and final == pytest.approx([final[0]] * len(DSEE_RUNS), rel=1e-5)


def test_full_fine_tuning_with_chunked_loss_under_zero3_equals_plain_zero2(runs):
    """Every parameter trainable, the head tied to the embedding: the chunked loss returns the head's gradient
    while ZeRO-3 holds the weight gathered for backward, and the updates equal ZeRO-2's plain run."""
    reference = train_losses(runs / "full_zero2_plain")
    assert len(reference) == 3 and reference[-1] < reference[0]
    assert reference != pytest.approx(train_losses(runs / "zero2_plain"), rel=1e-3)  # another method really ran
    assert train_losses(runs / "full_zero3_chunked") == pytest.approx(reference, rel=1e-5, abs=1e-6)
