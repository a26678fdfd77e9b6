"""Same seed and data -> same losses under ZeRO-0/2/3 and at world size 1 and 2 (real gloo ranks)."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from dsee_dist.config import load_config
from dsee_dist.data import dataset as data
from dsee_dist.dsee.adapter import ADAPTER_WEIGHTS, load_adapted_model
from dsee_dist.models import loading as models
from dsee_dist.recipes.finetune import token_loss_sum
from tests.distributed.launch import TINY_RUN, read_metrics, run_training, train_losses

pytestmark = pytest.mark.distributed

# name: (world size, engine config, launcher). ZeRO-3 runs under the `deepspeed` launcher as users start it; the
# other two-rank runs start their ranks directly (tests/distributed/launch.py), saving the launcher's start-up.
RUNS = {
    "ws1_zero0": (1, "configs/ds/zero0_fp32.json", "env"),
    "ws2_zero0": (2, "configs/ds/zero0_fp32.json", "env"),
    "ws2_zero2": (2, "configs/ds/zero2_fp32.json", "env"),
    "ws2_zero3": (2, "configs/ds/zero3_fp32.json", "deepspeed"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, (world, ds, launcher) in RUNS.items():
        # world size 1 uses micro-batch 8 so the global batch (8) equals that of 2 ranks x 4
        micro = ["train.micro_batch_size=8"] if world == 1 else []
        proc = run_training(world, root / name, *TINY_RUN, *micro, f"deepspeed.config={ds}", launcher=launcher)
        out[name] = (root / name, proc.stdout)
    return out


def test_losses_agree_across_zero_stages_and_world_sizes(runs):
    reference = train_losses(runs["ws1_zero0"][0])
    assert len(reference) == 6 and reference[-1] < reference[0]  # it learns
    for name, (out_dir, _) in runs.items():
        torch.testing.assert_close(
            torch.tensor(train_losses(out_dir)),
            torch.tensor(reference),
            rtol=1e-5,
            atol=1e-6,
            msg=f"{name} diverges from ws1_zero0",
        )
        evals = [r["eval_loss"] for r in read_metrics(out_dir) if "eval_loss" in r]
        ref_evals = [r["eval_loss"] for r in read_metrics(runs["ws1_zero0"][0]) if "eval_loss" in r]
        assert evals == pytest.approx(ref_evals, rel=1e-5)


def test_gradient_norms_are_logged_and_agree_with_deepspeeds_own(runs):
    # ZeRO-2/3 report DeepSpeed's own norm (before clipping); fp32 ZeRO-0 keeps none, so the loop measures it.
    def norms(name):
        return [r["grad_norm"] for r in read_metrics(runs[name][0]) if "loss" in r]

    reference = norms("ws2_zero2")
    assert len(reference) == 6 and all(n is not None and n > 0 for n in reference)
    for name in RUNS:
        assert norms(name) == pytest.approx(reference, rel=1e-4), name


def test_support_is_computed_once_and_identical_at_any_world_size(runs):
    supports = {name: load_file(str(out / "support.safetensors")) for name, (out, _) in runs.items()}
    ref = supports["ws1_zero0"]
    assert len(ref) == 4 and all(t.shape == (2, 16) for t in ref.values())  # 2 layers x (q, v)
    for name, s in supports.items():
        assert s.keys() == ref.keys() and all(torch.equal(s[k], ref[k]) for k in ref), name


def test_two_ranks_on_one_node_share_its_cores(runs):
    cores = len(os.sched_getaffinity(0))
    expected = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // 2))
    assert f"world size 2; {expected} CPU threads per rank" in runs["ws2_zero3"][1]


def test_parameter_summary_is_correct_under_zero3(runs):
    def summary(stdout):
        return next(line for line in stdout.splitlines() if "trainable params:" in line).split("] ", 1)[1]

    assert summary(runs["ws2_zero3"][1]) == summary(runs["ws1_zero0"][1])
    assert "trainable params: 0 " not in summary(runs["ws2_zero3"][1])


def _first_step_base_loss(out_dir):
    """The loss of step 1 computed with plain transformers on the base model (no DeepSpeed, no DSEE)."""
    cfg = load_config(out_dir / "config.resolved.yaml")
    tokenizer = models.load_tokenizer(out_dir / "base_model")
    train_split, _ = data.load_splits(cfg, tokenizer, out_dir)
    schedule = data.GlobalBatchSchedule(len(train_split), 8, 1, 0, 1, cfg.train.seed)
    base = models.load_model(out_dir / "base_model").eval()
    (indices,) = schedule.micro_batches(0)
    loss, n = token_loss_sum(base, data.collate(train_split, indices, tokenizer.pad_token_id), "cpu")
    return loss.item() / n


def test_zero3_loaded_weights_are_the_pretrained_ones(runs):
    # At step 0 the adapted model equals the base model, so the first logged loss is the base model's loss.
    # A ZeRO-3 model created with wrongly initialised weights (bare zero.Init) fails this.
    out_dir = runs["ws2_zero3"][0]
    assert train_losses(out_dir)[0] == pytest.approx(_first_step_base_loss(out_dir), rel=1e-5)


def test_zero3_adapter_holds_real_tensors_and_reproduces_eval_loss(runs):
    out_dir = runs["ws2_zero3"][0]
    tensors = load_file(str(out_dir / "adapter" / ADAPTER_WEIGHTS))
    assert tensors["transformer.h.0.attn.c_attn.lora_a"].shape == (2 * 4, 64)
    assert tensors["transformer.h.0.attn.c_attn.lora_b"].shape == (2, 64, 4)
    assert tensors["transformer.h.0.attn.c_attn.sparse_values"].shape == (32,)
    assert all(t.numel() > 0 for t in tensors.values())
    assert tensors["transformer.h.1.attn.c_attn.lora_b"].abs().sum() > 0  # trained, not the zero init
    assert tensors["transformer.h.1.attn.c_attn.sparse_values"].abs().sum() > 0
    # Adapters trained under ZeRO-3 and ZeRO-0 agree
    other = load_file(str(runs["ws1_zero0"][0] / "adapter" / ADAPTER_WEIGHTS))
    for key in tensors:
        torch.testing.assert_close(tensors[key], other[key], rtol=1e-4, atol=1e-6)

    # Rebuilt on top of the base in a plain process: the final eval loss is reproduced.
    model = load_adapted_model(out_dir / "adapter")
    cfg = load_config(out_dir / "config.resolved.yaml")
    tokenizer = models.load_tokenizer(out_dir / "base_model")
    _, eval_split = data.load_splits(cfg, tokenizer, out_dir)
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for indices in data.eval_batches(eval_split, 4, 0, 1):
            loss, n = token_loss_sum(model, data.collate(eval_split, indices, tokenizer.pad_token_id), "cpu")
            loss_sum, tokens = loss_sum + loss.item(), tokens + n
    final_eval = [r["eval_loss"] for r in read_metrics(out_dir) if "eval_loss" in r][-1]
    assert loss_sum / tokens == pytest.approx(final_eval, rel=1e-5)
    assert math.isfinite(final_eval)


def test_only_adapters_carry_optimizer_state_and_zero_partitions_it(runs):
    trainable = 2 * (2 * 4 * 64 + 2 * 64 * 4 + 2 * 16)  # 2 layers x (A + B + sparse values of q and v)

    def state(name):
        return next(r["optimizer_state_numel"] for r in read_metrics(runs[name][0]) if "optimizer_state_numel" in r)

    assert state("ws1_zero0") == trainable
    assert state("ws2_zero0") == 2 * trainable  # replicated on both ranks
    for name in ("ws2_zero2", "ws2_zero3"):  # partitioned: one copy over both ranks (plus alignment padding)
        assert trainable <= state(name) <= trainable + 64, name


def test_torchrun_runs_the_same_program_with_the_same_losses(runs, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.distributed.launch import free_port

    out = tmp_path / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "dsee_dist.train",
        "--config",
        "configs/quickstart.yaml",
        f"output.dir={out}",
        *TINY_RUN,
        "deepspeed.config=configs/ds/zero2_fp32.json",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(
        torch.tensor(train_losses(out)), torch.tensor(train_losses(runs["ws1_zero0"][0])), rtol=1e-5, atol=1e-6
    )


def test_config_error_under_the_launcher_is_one_line_and_nonzero(tmp_path):
    import subprocess

    from tests.conftest import REPO
    from tests.distributed.launch import train_command

    proc = subprocess.run(
        train_command(2, tmp_path / "bad", *TINY_RUN, "dsee.target_modules=[nothing_here]"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("dsee_dist: error:")]
    assert len(errors) == 1 and "match no adaptable module" in errors[0]


def test_jobs_leave_no_shared_memory_segments_behind(runs):
    # DeepSpeed's CPU allreduce never unlinks its 66 MB /dev/shm segments; init_distributed does.
    import os
    from pathlib import Path

    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))


@pytest.fixture(scope="module")
def packed_runs(tmp_path_factory):
    """data.packing at world size 1 (ZeRO-0) and 2 (ZeRO-2 and ZeRO-3, one launch of two ranks)."""
    from tests.distributed.launch import run_jobs_in_one_launch

    root = tmp_path_factory.mktemp("packed")
    packed = [*TINY_RUN, "data.packing=true", "data.block_size=192"]
    run_training(
        1, root / "ws1_zero0", *packed, "train.micro_batch_size=8", "deepspeed.config=configs/ds/zero0_fp32.json"
    )
    jobs = {name: (root / name, [*packed, f"deepspeed.config={RUNS[name][1]}"]) for name in ("ws2_zero2", "ws2_zero3")}
    run_jobs_in_one_launch(2, jobs)
    return {name: root / name for name in ("ws1_zero0", "ws2_zero2", "ws2_zero3")}


def test_packed_runs_agree_across_zero_stages_and_world_sizes_and_equal_the_unpacked_loss(packed_runs):
    reference = train_losses(packed_runs["ws1_zero0"])
    assert len(reference) == 6 and reference[-1] < reference[0]
    for name, out_dir in packed_runs.items():
        torch.testing.assert_close(torch.tensor(train_losses(out_dir)), torch.tensor(reference), rtol=1e-5, atol=1e-6)
        padding = [r["padding_fraction"] for r in read_metrics(out_dir) if "padding_fraction" in r]
        assert padding and all(0 <= p < 0.5 for p in padding), name
    # Step 1 of the ZeRO-3 run, recomputed with plain transformers on the base model from its rows' examples
    # taken apart and padded (no packing): the same loss, so no token attended or was labelled across examples.
    out_dir = packed_runs["ws2_zero3"]
    cfg = load_config(out_dir / "config.resolved.yaml")
    tokenizer = models.load_tokenizer(out_dir / "base_model")
    train_split, _ = data.load_splits(cfg, tokenizer, out_dir)
    assert train_split.packed
    (indices,) = data.GlobalBatchSchedule(len(train_split), 8, 1, 0, 1, cfg.train.seed).micro_batches(0)
    ids, labels, rows = [], [], 0
    for row_ids, row_labels, positions in train_split.examples(indices):
        starts = [*(positions == 0).nonzero().flatten().tolist(), len(positions)]
        rows += 1
        for a, b in zip(starts, starts[1:]):
            ids.append(row_ids[a:b])
            labels.append(torch.cat([torch.tensor([data.IGNORE_INDEX]), row_labels[a + 1 : b]]))
    assert len(ids) > rows  # some rows hold several examples
    unpacked = data.TokenizedSplit(ids, labels)
    base = models.load_model(out_dir / "base_model").eval()
    with torch.no_grad():
        loss, n = token_loss_sum(
            base, data.collate(unpacked, list(range(len(unpacked))), tokenizer.pad_token_id), "cpu"
        )
    assert train_losses(out_dir)[0] == pytest.approx(loss.item() / n, rel=1e-5)
