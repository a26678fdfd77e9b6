"""A chat dataset trains end to end through `data.format: chat` (one config change, no conversion): the run
resumes onto the uninterrupted run's exact losses, and `generate --chat` decodes from it."""

import json
import subprocess
import sys

import pytest

from dsee_dist.data.synthetic_e2e import generate_examples
from tests.conftest import REPO
from tests.distributed.launch import read_metrics

CHAT_RUN = [
    "model.builtin=null",
    "data.format=chat",
    "data.block_size=160",
    "data.system_prompt=You describe restaurants in one sentence.",
    "dsee.lora_rank=4",
    "dsee.lora_alpha=8",
    "dsee.num_sparse=8",
    "dsee.support=magnitude",
    "dsee.target_modules=auto",
    "dsee.fused_slices=[]",
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.lr=1e-2",
    "train.warmup_steps=0",
    "train.log_every_n_steps=1",
    "eval.every_n_steps=0",
    "checkpoint.every=2",
    "deepspeed.config=configs/ds/zero2_fp32.json",
]


def _train(chat_model, data, out, *extra):
    cmd = [sys.executable, "-m", "dsee_dist.train", "--config", "configs/quickstart.yaml", f"output.dir={out}"]
    cmd += [f"model.path={chat_model}", f"data.train_path={data}", *CHAT_RUN, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "e2e_chats.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Describe: {mr}"}, {"role": "assistant", "content": ref}]}
        for mr, ref in generate_examples(48, seed=5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_chat_run_trains_resumes_exactly_and_generates(chat_model, chats, tmp_path):
    whole = tmp_path / "whole"
    _train(chat_model, chats, whole)
    losses = [r["loss"] for r in read_metrics(whole) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]

    cut = tmp_path / "cut"
    _train(chat_model, chats, cut, "train.stop_after_steps=2")
    _train(chat_model, chats, cut, "resume=auto")
    resumed = {r["step"]: r["loss"] for r in read_metrics(cut) if "loss" in r}
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx(losses, rel=1e-6)

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(chats.read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "outputs.txt"
    cmd = [sys.executable, "-m", "dsee_dist", "generate", str(whole), "--chat", "--input", str(held_out)]
    cmd += ["--output", str(out), "--greedy", "--max-new-tokens", "8", "--score"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 3
    assert "chrF" in json.loads((tmp_path / "outputs.scores.json").read_text())["scores"]
