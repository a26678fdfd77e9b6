"""`dsee-dist generate` from a 2-rank ZeRO-3 checkpoint and from each export of it: every source gives the
unmerged model's greedy output (one prompt at a time, no cache), and 2 generating ranks write the same file
as 1, line by line."""

import subprocess
import sys

import pytest
import torch

from dsee_dist.engine.distributed import free_port
from dsee_dist.eval.decoding import DecodingSettings, clean_output, generate_texts, stop_token_ids
from dsee_dist.recipes import generate
from tests.conftest import REPO
from tests.distributed.launch import TINY_RUN, run_training

pytestmark = pytest.mark.distributed

MAX_NEW, NUM_INPUTS = 12, 10
DECODE = ["--greedy", "--max-new-tokens", str(MAX_NEW), "--batch-size", "3", "--max-inputs", str(NUM_INPUTS)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """6 steps at world size 2 under ZeRO-3 (quickstart's engine JSON), lr 1e-2: the adapter moves the outputs."""
    out = tmp_path_factory.mktemp("gen") / "run"
    run_training(2, out, *TINY_RUN, "eval.every_n_steps=0")
    return out


def _inputs(run_dir):
    return run_dir / "data" / "synthetic_e2e_eval.csv"


def _prompts(run_dir):
    return generate.read_prompts(_inputs(run_dir))[1][:NUM_INPUTS]


def _one_by_one(model, tokenizer, prompts):
    stop_ids = stop_token_ids(tokenizer, True)
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids, new = tokenizer(prompt, add_special_tokens=False)["input_ids"], []
            while len(new) < MAX_NEW and (not new or new[-1] not in stop_ids):
                new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
            outputs.append(clean_output(tokenizer.decode(new, skip_special_tokens=True)))
    return outputs


def _generate(model, tokenizer, prompts):
    return generate_texts(model, tokenizer, prompts, DecodingSettings(max_new_tokens=MAX_NEW, batch_size=3).greedy())[0]


def test_every_source_gives_the_unmerged_greedy_output(run_dir, tmp_path):
    from dsee_dist.recipes.export import build_model_from_checkpoint, export_merged, resolve_checkpoint

    torch.set_num_threads(1)
    prompts = _prompts(run_dir)
    model, tokenizer, kind = generate.load_generation_model(str(run_dir))  # (a) the ZeRO-3, world-2 checkpoint
    assert kind.startswith("checkpoint")
    expected = _one_by_one(model, tokenizer, prompts)
    assert _generate(model, tokenizer, prompts) == expected
    adapter_model, tokenizer, kind = generate.load_generation_model(str(run_dir / "adapter"))  # (b)
    assert kind == "adapter" and _generate(adapter_model, tokenizer, prompts) == expected
    checkpoint_model, cfg, base = build_model_from_checkpoint(resolve_checkpoint(str(run_dir)))
    export_merged(checkpoint_model, cfg, base, tmp_path / "merged", log=lambda _: None)
    merged, tokenizer, kind = generate.load_generation_model(str(tmp_path / "merged"))  # (c)
    assert kind == "hf-model" and _generate(merged, tokenizer, prompts) == expected
    plain, tokenizer, _ = generate.load_generation_model(str(run_dir / "base_model"))  # (d)
    base_outputs = _generate(plain, tokenizer, prompts)
    assert base_outputs == _one_by_one(plain, tokenizer, prompts) and base_outputs != expected


def _command(world_size, run_dir, output, *extra):
    args = [str(run_dir), "--input", str(_inputs(run_dir)), "--output", str(output), *DECODE, *extra]
    if world_size == 1:
        return [sys.executable, "-m", "dsee_dist", "generate", *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size), "--master_port",
            str(free_port()), "--module", "dsee_dist.generate", *args]


def test_two_ranks_write_the_one_rank_file_in_input_order(run_dir, tmp_path):
    outputs = {}
    for world_size in (1, 2):
        out = tmp_path / f"out{world_size}.txt"
        proc = subprocess.run(_command(world_size, run_dir, out), cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "tokens/s" in proc.stdout
        outputs[world_size] = out.read_text().splitlines()
    assert len(outputs[1]) == NUM_INPUTS and outputs[2] == outputs[1]
    model, tokenizer, _ = generate.load_generation_model(str(run_dir))
    assert outputs[1] == _generate(model, tokenizer, _prompts(run_dir))
