"""Sharded checkpoints: exact resume, world-size change, kill -9 mid-save, preemption, consolidation."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dsee_dist.dsee.adapter import ADAPTER_WEIGHTS
from tests.conftest import REPO
from tests.distributed.launch import (
    TINY_RUN,
    launch_training,
    run_jobs_in_one_launch,
    run_training,
    train_command,
    train_losses,
)
from tests.hooks import hook_env

pytestmark = pytest.mark.distributed

STEPS = 8
BASE = [
    *TINY_RUN,
    f"train.max_steps={STEPS}",
    "train.warmup_steps=2",
    "checkpoint.every=4",
    "checkpoint.keep_last=2",
    "eval.every_n_steps=0",
]


def _stage(stage):
    return f"deepspeed.config=configs/ds/zero{stage}_fp32.json"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """8 uninterrupted steps at world size 2 under ZeRO-2 and ZeRO-3 (one launch: tests/distributed/sequential_jobs)."""
    root = tmp_path_factory.mktemp("full")
    run_jobs_in_one_launch(2, {f"z{stage}": (root / f"z{stage}", [*BASE, _stage(stage)]) for stage in (2, 3)})
    return {stage: root / f"z{stage}" for stage in (2, 3)}


def _adapter(out):
    return load_file(str(out / "adapter" / ADAPTER_WEIGHTS))


MICRO = {1: 8, 2: 4, 4: 2}  # micro-batch per world size: the same global batch of 8


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Runs stopped after step 4 (train.stop_after_steps), by (ZeRO stage, world size); each test resumes a copy."""
    root = tmp_path_factory.mktemp("stopped")
    runs = {(stage, world): root / f"z{stage}_ws{world}" for stage, world in ((2, 2), (3, 2), (2, 1))}
    for world in (2, 1):  # the jobs of one world size in one launch
        jobs = {
            out.name: (
                out,
                [*BASE, _stage(stage), f"train.micro_batch_size={MICRO[world]}", "train.stop_after_steps=4"],
            )
            for (stage, w), out in runs.items()
            if w == world
        }
        run_jobs_in_one_launch(world, jobs)
    return runs


def _copy(src, tmp_path):
    import shutil

    return shutil.copytree(src, tmp_path / "run")


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_the_exact_loss_curve(stage, stopped, uninterrupted, tmp_path):
    first_half = stopped[stage, 2]
    assert (first_half / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not (first_half / "adapter").exists()
    out = _copy(first_half, tmp_path)
    proc = run_training(2, out, *BASE, _stage(stage), "resume=auto")
    assert "resume: continuing from step 4" in proc.stdout
    ref = uninterrupted[stage]
    assert train_losses(out) == pytest.approx(train_losses(ref), rel=1e-6, abs=1e-6) and len(train_losses(out)) == STEPS
    # adapter-sized: the frozen base (tied lm_head included) is not rewritten
    for f in (out / "checkpoints" / "step_00000008").glob("*model_states.pt"):
        module = torch.load(f, map_location="cpu", weights_only=False)["module"]
        assert {k.rsplit(".", 1)[-1] for k in module} == {"lora_a", "lora_b", "sparse_values", "sparse_index"}, f
    for key, value in _adapter(ref).items():
        torch.testing.assert_close(_adapter(out)[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_resume_under_another_zero_stage_continues_the_loss_curve(stopped, uninterrupted, tmp_path):
    out = _copy(stopped[2, 2], tmp_path)
    proc = run_training(2, out, *BASE, _stage(3), "resume=auto")
    assert "ZeRO stage 2; resharded" in proc.stdout
    assert train_losses(out) == pytest.approx(train_losses(uninterrupted[3]), rel=1e-5)


@pytest.mark.parametrize("stage,before,after", [(3, 2, 1), (2, 1, 2), (2, 2, 4)])
def test_resume_at_another_world_size_continues_the_loss_curve(stage, before, after, stopped, uninterrupted, tmp_path):
    out = _copy(stopped[stage, before], tmp_path)
    proc = run_training(after, out, *BASE, _stage(stage), f"train.micro_batch_size={MICRO[after]}", "resume=auto")
    if before != after:
        assert f"written at world size {before}, ZeRO stage {stage}; resharded" in proc.stdout
    assert train_losses(out) == pytest.approx(train_losses(uninterrupted[stage]), rel=1e-5)


def test_kill_9_of_one_rank_mid_save_keeps_the_previous_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, **hook_env(kill_in_save=(1, 8)))  # rank 1 dies after writing its shards of step 8
    proc = launch_training(2, out, *BASE, _stage(2), env=env)
    assert proc.returncode != 0
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert (root / "step_00000008.partial").is_dir() and not (root / "step_00000008").exists()
    proc = run_training(2, out, *BASE, _stage(2), "resume=auto")
    assert "continuing from step 4" in proc.stdout
    assert train_losses(out) == pytest.approx(train_losses(uninterrupted[2]), rel=1e-6, abs=1e-6)
    assert (root / "latest").read_text() == "step_00000008" and not (root / "step_00000008.partial").exists()


def test_sigusr1_checkpoints_exits_75_and_resumes_to_the_same_losses(uninterrupted, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, **hook_env(step_delay_s=0.5))
    launcher = subprocess.Popen(
        train_command(2, out, *BASE, _stage(2), "checkpoint.every=0"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len(train_losses(out)) >= 2:
            break
        time.sleep(0.2)
    ranks = [
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if "dsee_dist.train" in p.cmdline() and "deepspeed.launcher.launch" not in p.cmdline()
    ]
    assert len(ranks) == 2
    for rank in ranks:  # what Slurm's --signal does: every task gets it
        rank.send_signal(signal.SIGUSR1)
    time.sleep(0.6)  # the step finishes and the save starts; a second signal must not disturb it
    for rank in ranks:
        if rank.is_running():
            rank.send_signal(signal.SIGUSR1)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 75, output[-3000:]
    reached = len(train_losses(out))
    assert 2 <= reached < STEPS
    assert (out / "checkpoints" / "latest").read_text() == f"step_{reached:08d}"
    assert "received SIGUSR1" in output
    run_training(2, out, *BASE, _stage(2), "resume=auto", "checkpoint.every=0")
    assert train_losses(out) == pytest.approx(train_losses(uninterrupted[2]), rel=1e-6, abs=1e-6)


def test_zero3_checkpoint_holds_real_tensors_and_zero_to_fp32_reads_it(uninterrupted, tmp_path):
    root = uninterrupted[3] / "checkpoints"
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "zero_to_fp32.py"),
            str(root),
            str(tmp_path / "fp32"),
            "--tag",
            "step_00000008",
            "--exclude_frozen_parameters",
            "--safe_serialization",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (weights,) = list((tmp_path / "fp32").glob("*.safetensors"))
    consolidated = load_file(str(weights))
    adapter = _adapter(uninterrupted[3])
    assert set(consolidated) == set(adapter)  # A, B, sparse values and the support (a buffer), nothing frozen
    for key, value in adapter.items():
        assert consolidated[key].numel() > 0 and consolidated[key].abs().sum() > 0, key
        torch.testing.assert_close(consolidated[key], value, rtol=0, atol=0, msg=key)


def test_merged_export_reloads_with_plain_transformers_and_matches(uninterrupted, tmp_path):
    out = uninterrupted[3]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsee_dist",
            "export",
            str(out),
            "--merged",
            str(tmp_path / "merged"),
            "--adapter",
            str(tmp_path / "adapter"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); "
        "torch.save(m(input_ids=torch.load(sys.argv[2])).logits.detach(), sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "merged"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        timeout=300,
    )
    from dsee_dist.dsee.adapter import load_adapted_model

    with torch.no_grad():
        expected = load_adapted_model(out / "adapter")(input_ids=x).logits  # the training-time model
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-5, atol=1e-5)
    exported = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    for key, value in _adapter(out).items():
        torch.testing.assert_close(exported[key], value)


def test_incompatible_config_is_refused_naming_the_keys(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted[2], out)
    proc = launch_training(
        2, out, *BASE, _stage(2), "resume=auto", "dsee.lora_rank=2", "dsee.num_sparse=8", "train.max_steps=12"
    )
    assert proc.returncode != 0
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsee_dist: error:")]
    assert "dsee.lora_rank: 4 -> 2" in line and "dsee.num_sparse: 16 -> 8" in line


def test_corrupt_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted[2], out)
    victim = out / "checkpoints" / "step_00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    explicit = launch_training(
        1, out, *BASE, _stage(2), "train.micro_batch_size=8", f"resume={out / 'checkpoints' / 'step_00000008'}"
    )
    assert explicit.returncode == 2 and f"checkpoint file '{victim}' is truncated" in explicit.stderr
    proc = run_training(2, out, *BASE, _stage(2), "resume=auto", "train.max_steps=8")
    assert (
        f"checkpoint file '{victim}' is truncated" in proc.stdout
        and "falling back to the previous checkpoint" in proc.stdout
    )
    assert "continuing from step 4" in proc.stdout
    assert train_losses(out) == pytest.approx(train_losses(uninterrupted[2]), rel=1e-6, abs=1e-6)
