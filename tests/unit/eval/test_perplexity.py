"""`dsee-dist evaluate --perplexity`: the literature's protocol (one tokenisation, non-overlapping windows, mean
token NLL over all windows, exp) equals a plain transformers computation of it; ranks split the windows; bad
requests get one line and exit 2."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsee_dist.eval import perplexity
from dsee_dist.models.tokenizer import train_bpe_tokenizer
from dsee_dist.recipes import evaluate
from tests.conftest import tiny_gpt2

WORDS = "the a model weight sparse prune head neuron layer token window text of in on and is was".split()


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory):
    """A tiny random GPT-2 (64 positions) with a BPE tokenizer, and a text file of ~2,000 tokens."""
    tmp = tmp_path_factory.mktemp("ppl")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) for _ in range(120)]
    lines[5] = lines[40] = ""  # blank lines, as WikiText has
    (tmp / "text.txt").write_text("\n".join(lines) + "\n")
    tokenizer = train_bpe_tokenizer(lines, vocab_size=300)
    model = tiny_gpt2(seed=3, vocab=len(tokenizer))
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    return tmp / "model", tmp / "text.txt", lines


def _reference(model_dir, lines, seq_len):
    """The protocol written out with plain transformers: the model's own loss (labels=) per window."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer("\n\n".join(lines), return_tensors="pt").input_ids
    n = ids.shape[1] // seq_len
    with torch.no_grad():
        losses = [
            model(ids[:, i * seq_len : (i + 1) * seq_len], labels=ids[:, i * seq_len : (i + 1) * seq_len]).loss
            for i in range(n)
        ]
    return math.exp(float(torch.stack(losses).mean())), n


def _json_line(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1]), out


@pytest.mark.parametrize("seq_len", [16, None])
def test_perplexity_equals_a_plain_transformers_computation(model_and_text, capsys, tmp_path, seq_len):
    model_dir, text, lines = model_and_text
    args = ["--perplexity", str(text), "--model", str(model_dir), "--out", str(tmp_path / "ppl.json")]
    args += ["--seq-len", str(seq_len)] if seq_len else []
    assert evaluate.main(args + ["--batch-size", "3"]) == 0
    result, out = _json_line(capsys)
    expected_len = seq_len or 64  # default: min(model context (64 positions), 2048)
    expected, windows = _reference(model_dir, lines, expected_len)
    assert result["seq_len"] == expected_len and result["windows"] == windows > 2
    assert result["tokens_scored"] == windows * (expected_len - 1)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert any(line.startswith("perplexity") for line in out)  # the table before the JSON line
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] == result["perplexity"]


def test_ranks_split_the_windows_and_their_sums_add_up(model_and_text):
    model_dir, _, _ = model_and_text
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    windows = torch.randint(0, model.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(1))
    whole = perplexity.window_sums(model, windows)
    parts = [perplexity.window_sums(model, windows, rank, 2, batch_size=2) for rank in range(2)]
    assert [count for _, count in parts] == [3 * 11, 2 * 11]  # windows 0, 2, 4 and 1, 3
    assert sum(nll for nll, _ in parts) == pytest.approx(whole[0], rel=1e-6)
    assert sum(count for _, count in parts) == whole[1]


def _bad(capsys, *args):
    code = evaluate.main(list(map(str, args)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("dsee-dist evaluate: error: "), err
    return err


def test_bad_requests_get_one_line_and_exit_2(model_and_text, capsys, tmp_path):
    model_dir, text, _ = model_and_text
    assert "text file" in _bad(capsys, "--perplexity", tmp_path / "nope.txt", "--model", model_dir)
    assert "model '" in _bad(capsys, "--perplexity", text, "--model", tmp_path / "nope")
    assert "needs --model" in _bad(capsys, "--perplexity", text)
    assert "without --refs/--hyp" in _bad(capsys, "--perplexity", text, "--model", model_dir, "--hyp", text)
    assert "give --refs and --hyp" in _bad(capsys, "--hyp", text)
    (tmp_path / "short.txt").write_text("the model\n")
    err = _bad(capsys, "--perplexity", tmp_path / "short.txt", "--model", model_dir, "--seq-len", "32")
    assert "fewer than one window of 32" in err
    assert "longer than the model's context (64" in _bad(
        capsys, "--perplexity", text, "--model", model_dir, "--seq-len", "65"
    )
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "is empty" in _bad(capsys, "--perplexity", tmp_path / "empty.txt", "--model", model_dir)
