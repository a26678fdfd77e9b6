"""`dsee-dist evaluate --perplexity` on two real ranks (gloo): the windows are split, the sums all-reduced, and
rank 0 prints the one-rank figures."""

import json
import random

import pytest

from dsee_dist.models.tokenizer import train_bpe_tokenizer
from tests.conftest import tiny_gpt2
from tests.distributed.launch import run_module

pytestmark = pytest.mark.distributed


def test_two_ranks_give_the_one_rank_perplexity(tmp_path):
    rng = random.Random(1)
    words = "sparse dense head neuron window token text weight".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) for _ in range(60)]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    tokenizer = train_bpe_tokenizer(lines, vocab_size=300)
    tiny_gpt2(seed=2, vocab=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    args = ["dsee_dist", "evaluate", "--perplexity", str(tmp_path / "text.txt"), "--model", str(tmp_path / "model")]
    results = {}
    for world_size in (1, 2):
        proc = run_module(world_size, [*args, "--seq-len", "16"], timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        json_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert len(json_lines) == 1, proc.stdout  # rank 0 alone prints
        results[world_size] = json.loads(json_lines[0])
    assert results[1]["windows"] % 2 == 1  # the ranks' shares differ by one window
    assert results[2]["tokens_scored"] == results[1]["tokens_scored"]
    assert results[2]["perplexity"] == pytest.approx(results[1]["perplexity"], rel=1e-6)
