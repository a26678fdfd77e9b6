"""`dsee-dist generate` from a 2-rank ZeRO-3 checkpoint and from each export of it: every source gives the
unmerged model's greedy output (one prompt at a time, no cache), and 2 generating ranks write the same file
as 1, line by line. The same ZeRO-3 run decodes during training (eval.generate_every_n_steps, partitioned,
synced_gpus), keeps its best checkpoint and writes its final generations."""

import json
import subprocess
import sys

import pytest
import torch

from dsee_dist.eval.decoding import DecodingSettings, clean_output, generate_texts, stop_token_ids
from dsee_dist.eval.metrics import compute_bleu
from dsee_dist.eval.references import read_references
from dsee_dist.recipes import generate
from tests.conftest import REPO
from tests.distributed.launch import TINY_RUN, read_metrics, run_ranks, run_training

pytestmark = pytest.mark.distributed

MAX_NEW, NUM_INPUTS = 12, 10
DURING_TRAINING = [
    "eval.every_n_steps=0",
    "eval.generate_every_n_steps=3",
    f"eval.generate_max_examples={NUM_INPUTS}",
    f"generate.max_new_tokens={MAX_NEW}",
    "generate.num_beams=2",
    "generate.batch_size=3",
    "eval.final_generate=true",
    "checkpoint.keep_best=bleu",
    "checkpoint.keep_last=1",
]
DECODE = ["--greedy", "--max-new-tokens", str(MAX_NEW), "--batch-size", "3", "--max-inputs", str(NUM_INPUTS)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """6 steps at world size 2 under ZeRO-3 (quickstart's engine JSON), lr 1e-2: the adapter moves the outputs;
    greedy BLEU/ROUGE-L at steps 3 and 6, the best checkpoint kept, the final generations written."""
    out = tmp_path_factory.mktemp("gen") / "run"
    run_training(2, out, *TINY_RUN, *DURING_TRAINING)
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


def _run(world_size, run_dir, output, *extra):
    args = [str(run_dir), "--input", str(_inputs(run_dir)), "--output", str(output), *DECODE, *extra]
    if world_size == 1:
        cmd = [sys.executable, "-m", "dsee_dist", "generate", *args]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    return run_ranks(world_size, ["dsee_dist.generate", *args])


def test_two_ranks_write_the_one_rank_file_in_input_order(run_dir, tmp_path):
    outputs = {}
    for world_size in (1, 2):
        out = tmp_path / f"out{world_size}.txt"
        proc = _run(world_size, run_dir, out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "tokens/s" in proc.stdout
        outputs[world_size] = out.read_text().splitlines()
    assert len(outputs[1]) == NUM_INPUTS and outputs[2] == outputs[1]
    model, tokenizer, _ = generate.load_generation_model(str(run_dir))
    assert outputs[1] == _generate(model, tokenizer, _prompts(run_dir))


def test_training_logs_the_bleu_of_its_own_greedy_outputs_and_keeps_the_best(run_dir):
    rows = [r for r in read_metrics(run_dir) if "eval_bleu" in r]
    assert [r["step"] for r in rows] == [3, 6] and all(0 <= r["eval_rouge_l"] <= 1 for r in rows)
    # step 6 is the final checkpoint: decoding its first MRs in one process gives the BLEU logged by the 2
    # partitioned ZeRO-3 ranks
    model, tokenizer, _ = generate.load_generation_model(str(run_dir))
    refs = read_references(_inputs(run_dir)).groups[:NUM_INPUTS]
    assert compute_bleu(_generate(model, tokenizer, _prompts(run_dir)), refs) == pytest.approx(
        rows[-1]["eval_bleu"], abs=1e-9
    )
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    first_max = max(rows, key=lambda r: (r["eval_bleu"], -r["step"]))
    assert best["step"] == first_max["step"] and best["value"] == first_max["eval_bleu"]
    kept = {p.name for p in (run_dir / "checkpoints").glob("step_*")}
    assert kept == {best["tag"], "step_00000006"}  # keep_last=1 plus the best


def test_final_generate_writes_every_eval_mr_and_the_five_figures(run_dir):
    num_mrs = len(read_references(_inputs(run_dir)).groups)
    assert len((run_dir / "generations.txt").read_text().splitlines()) == num_mrs
    scores = json.loads((run_dir / "generations.scores.json").read_text())
    assert scores["num_mrs"] == num_mrs and set(scores["scores"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
