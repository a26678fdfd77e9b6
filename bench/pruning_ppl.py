"""The pruning table (issue 41, item 3), the rows without tuning: SmolLM2-135M, WikiText-2 test perplexity by
`dsee-dist evaluate --perplexity`'s protocol, for 50 % unstructured, 2:4 and 25 % heads + 25 % MLP neurons.

    python bench/pruning_ppl.py --model models/smollm2-135m                  # every row (resumable)
    python bench/pruning_ppl.py --model models/smollm2-135m --max-windows 4  # a smoke run (not a result)

Rows (no tuning; the pruning code the two-stage recipe runs, on the pretrained weights with an empty adapter):
- `dense`;
- `u50-magnitude`: |W|, 50 % of every output row (`grouping: row`);
- `u50-wanda`: |W| x input-feature norm (`score: activation`, `grouping: row`, as Wanda);
- `2:4-magnitude`, `2:4-wanda`: `pattern: 2:4` with those scores;
- `s25-wanda`: 25 % of heads (rounded per KV group, `head_rounding: nearest`) + 25 % of MLP neurons, structured
  activation scores (`head_score: activation`).
Calibration (Wanda's): input norms over the first --calibration-windows windows of WikiText-2 valid.

Rows with tuning (the two-stage recipe, `python -m dsee_dist.train`, one process; WikiText-2 valid as
`data.format: text` in blocks of --seq-len tokens, its last 5 % held out and never trained on; the same learning
rate --lr for both methods, chosen before any run, not tuned on the test text; seed 42):
- `<pattern>-lora-recovery`: the pretrained model pruned as the `<pattern>-wanda` row (calibrated on --calibration
  -windows training blocks), then LoRA (r 8 on q_proj, v_proj; `dsee.num_sparse: 0`) tuned for one epoch on the
  pruned base with the pruned entries kept at zero (`prune.tune_first: false`);
- `<pattern>-dsee`: DSEE's recipe: stage 1 tunes DSEE (r 8 + the quality table's sparse budget, decomposition
  support) for one epoch on the dense model, the tuned weights are pruned by the same activation score, stage 2
  re-tunes for one epoch: the LoRA recovery's token budget in stage 2 (and as much again in stage 1).
The table's perplexity of a tuned row is its exported final model's (a stock transformers directory).

Resumable: each finished row is written atomically as <out>/rows/<row>.json; a rerun skips finished rows and
rebuilds <out>/table.md from all of them. Per row: perplexity, ratio to dense, trainable parameters, nonzero
weights of the decoder blocks' matrices, FLOPs per token (context --seq-len), wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench._common import write_json  # noqa: E402
from dsee_dist.config import PRUNE_MODULE_KINDS, PruneConfig  # noqa: E402
from dsee_dist.engine.process_group import DistInfo  # noqa: E402
from dsee_dist.eval import perplexity  # noqa: E402
from dsee_dist.utils.files import write_text_atomic  # noqa: E402

logger = logging.getLogger("bench.pruning_ppl")
SHARED_TEXT = REPO.parent / "shared" / "data" / "text"
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0)
EMPTY_ADAPTER = ({"layers": {}}, {})

ROWS: dict[str, dict | None] = {
    "dense": None,
    "u50-magnitude": dict(method="unstructured", score="base", grouping="row", ratio=0.5),
    "u50-wanda": dict(method="unstructured", score="activation", grouping="row", ratio=0.5),
    "2:4-magnitude": dict(method="unstructured", score="base", pattern="2:4"),
    "2:4-wanda": dict(method="unstructured", score="activation", pattern="2:4"),
    "s25-wanda": dict(method="structured", head_score="activation", head_ratio=0.25, mlp_ratio=0.25),
}
# tuned row: (the untuned row whose pruning it applies, the tuning method)
TUNED: dict[str, tuple[str, str]] = {
    f"{pattern}-{method}": (f"{pattern}-wanda", method)
    for pattern in ("u50", "2:4", "s25")
    for method in ("lora-recovery", "dsee")
}
ALL_ROWS = (*ROWS, *TUNED)
# Published ratios to dense (WikiText-2), for docs/results.md beside this table.
PUBLISHED = (
    "Wanda README, LLaMA-2-7B: dense 5.12; 50 % magnitude 14.89 / SparseGPT 6.51 / Wanda 6.42; "
    "2:4 54.59 / 10.17 / 11.02"
)


def row_file(out: Path, name: str) -> Path:
    return out / "rows" / f"{name.replace(':', '-')}.json"


@torch.no_grad()
def calibration_norms(model, modules: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per module, the L2 norm of each input feature over every token of `windows` (Wanda's calibration)."""
    sums = {name: None for name in modules}
    hooks = []
    for name in modules:

        def hook(_module, inputs, _output, name=name):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            total = x.square().sum(dim=0)
            sums[name] = total if sums[name] is None else sums[name] + total

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        for window in windows:
            model(input_ids=window[None])
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def nonzero_block_weights(model) -> tuple[int, int]:
    """(nonzero, total) entries of the decoder blocks' prunable matrices."""
    from dsee_dist.dsee.layer import weight_out_in
    from dsee_dist.pruning.targets import prunable_matrices

    nonzero = total = 0
    for m in prunable_matrices(model.config, list(PRUNE_MODULE_KINDS)):
        w = weight_out_in(model.get_submodule(m.module))[m.rows[0] : m.rows[0] + m.rows[1]]
        nonzero, total = nonzero + int((w != 0).sum()), total + w.numel()
    return nonzero, total


def run_row(name: str, args, tokens: dict, out: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsee_dist.models.flops import flops_per_token
    from dsee_dist.models.pruned_gpt2 import register
    from dsee_dist.pruning.structured import calibration_modules, prune_structured
    from dsee_dist.pruning.targets import prunable_matrices
    from dsee_dist.pruning.unstructured import prune_unstructured

    register()
    started = time.perf_counter()
    spec = ROWS.get(name)
    model_dir, tuned = Path(args.model), {}
    if name in TUNED:
        model_dir, tuned = train_tuned(name, args, out)
    elif spec is not None:
        cfg = PruneConfig(**spec)
        model_dir = out / "models" / name.replace(":", "-")
        shutil.rmtree(model_dir, ignore_errors=True)
        norms = None
        if cfg.calibrates:
            dense = AutoModelForCausalLM.from_pretrained(args.model).eval()
            if cfg.method == "unstructured":
                modules = list(dict.fromkeys(m.module for m in prunable_matrices(dense.config, cfg.modules)))
            else:
                modules = calibration_modules(dense.config)
            norms = calibration_norms(dense, modules, tokens["calibration"])
            del dense
        if cfg.method == "unstructured":
            prune_unstructured(
                cfg, args.model, EMPTY_ADAPTER, model_dir, SINGLE, seed=0, log=logger.info, input_norms=norms
            )
        else:
            prune_structured(cfg, args.model, EMPTY_ADAPTER, model_dir, SINGLE, log=logger.info, input_norms=norms)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    result = perplexity.compute_perplexity(model, tokens["test"], args.seq_len, log=logger.info)
    nonzero, total = nonzero_block_weights(model)
    row = {
        "row": name,
        "prune": spec if name not in TUNED else tuned["config"]["prune"],
        "perplexity": result.perplexity,
        "windows": result.windows,
        "seq_len": result.seq_len,
        "trainable_params": tuned.get("trainable_params", 0),
        **{k: v for k, v in tuned.items() if k not in ("trainable_params", "config")},
        "nonzero_block_weights": nonzero,
        "block_weights": total,
        "flops_per_token": flops_per_token(AutoConfig.from_pretrained(model_dir), args.seq_len)["total"],
        "wall_s": time.perf_counter() - started,
        "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, fp32",
        "smoke": bool(args.max_windows or args.tune_steps),
    }
    if spec is not None and name not in TUNED and not args.keep_models:
        shutil.rmtree(model_dir, ignore_errors=True)
    return row


def tuned_config(name: str, args, run_dir: Path, calibration_examples: int) -> dict:
    """The two-stage config of a tuned row (a plain dict, written as the run's YAML)."""
    from bench._quality_rows import LORA_RANK, adapted_shapes, adapter_section, sparse_budget

    source, method = TUNED[name]
    lora = method == "lora-recovery"
    num_sparse = 0 if lora else sparse_budget(adapted_shapes(args.model), LORA_RANK)["num_sparse"]
    length = {"max_steps": args.tune_steps, "epochs": 0.0} if args.tune_steps else {"max_steps": 0, "epochs": 1.0}
    prune = {
        **ROWS[source],
        "tune_first": not lora,
        "calibration_examples": calibration_examples,
        "retrain_steps": length["max_steps"],
        "retrain_epochs": length["epochs"],
        "retrain_lr": args.lr,
    }
    return {
        "method": "dsee",
        "model": {"path": str(Path(args.model).resolve()), "dropout": 0.0},
        "data": {"format": "text", "train_path": str(Path(args.valid).resolve()), "block_size": args.seq_len},
        "dsee": adapter_section(num_sparse),
        "train": {
            "seed": 42,
            "lr": args.lr,
            "weight_decay": 0.0,
            "schedule": "linear",
            "warmup_steps": 3,
            "grad_clip": 1.0,
            "micro_batch_size": args.micro_batch_size,
            "grad_accum_steps": args.grad_accum_steps,
            **length,
            "log_every_n_steps": 5,
        },
        "eval": {"every_n_steps": 0, "micro_batch_size": args.micro_batch_size},
        "prune": prune,
        "checkpoint": {"every": 10, "keep_last": 1},
        "deepspeed": {"config": str(REPO / "configs" / "ds" / "zero0_fp32.json")},
        "output": {"dir": str(run_dir)},
        "resume": "auto",
    }


def train_tuned(name: str, args, out: Path) -> tuple[Path, dict]:
    """Run (or resume) a tuned row's two-stage training in a child process; (its final model, usage)."""
    import yaml

    from bench._common import run_with_usage
    from dsee_dist.engine.launcher import launch_env

    run_dir = out / "runs" / name.replace(":", "-")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = tuned_config(name, args, run_dir, args.calibration_windows)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = launch_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    logger.info(f"{name}: training (two-stage recipe) -> {run_dir} (log: {run_dir / 'train.log'})")
    start = time.perf_counter()
    status, usage = run_with_usage(
        [sys.executable, "-m", "dsee_dist.train", "--config", str(run_dir / "config.yaml")],
        env,
        run_dir / "train.log",
        append=True,
    )
    if status != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise SystemExit(f"bench/pruning_ppl.py: {name}'s training exited {status}; rerun to resume:\n{tail}")
    return run_dir / "final", {
        "train_wall_s": round(time.perf_counter() - start, 1),
        "train_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "trainable_params": trainable_count(run_dir),
        "train_tokens": trained_tokens(run_dir, config),
        "config": config,
    }


def trainable_count(run_dir: Path) -> int:
    """The trainable parameters of the row's last stage, as its trainer logged them."""
    import re

    found = re.findall(r"for ([\d,]+) trainable parameters", (run_dir / "train.log").read_text())
    return int(found[-1].replace(",", "")) if found else 0


def trained_tokens(run_dir: Path, config: dict) -> dict:
    """{stage: tokens trained}: its last step x the global batch x the block (text blocks are full; one process)."""
    per_step = config["train"]["micro_batch_size"] * config["train"]["grad_accum_steps"] * config["data"]["block_size"]
    tokens = {}
    for stage in ("stage1", "stage2"):
        metrics = run_dir / stage / "metrics.jsonl"
        if metrics.is_file():
            steps = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
            tokens[stage] = steps * per_step
    return tokens


def write_table(out: Path) -> str:
    rows = {}
    for path in sorted((out / "rows").glob("*.json")):
        row = json.loads(path.read_text())
        rows[row["row"]] = row
    dense = rows.get("dense", {}).get("perplexity")
    lines = [
        "| row | perplexity | ratio to dense | trainable | nonzero block weights | FLOPs/token | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ALL_ROWS:
        row = rows.get(name)
        if row is None:
            lines.append(f"| {name} | not run | | | | | |")
            continue
        ratio = f"{row['perplexity'] / dense:.2f}x" if dense else "n/a"
        share = row["nonzero_block_weights"] / max(row["block_weights"], 1)
        lines.append(
            f"| {name}{' (smoke)' if row['smoke'] else ''} | {row['perplexity']:.2f} | {ratio} | "
            f"{row['trainable_params']:,} | {100 * share:.1f}% | {row['flops_per_token'] / 1e6:.1f} M | "
            f"{row['wall_s']:.0f} |"
        )
    devices = sorted({row["device"] for row in rows.values()})
    text = "\n".join(lines) + f"\n\nDevice: {'; '.join(devices) or 'none yet'}. Published: {PUBLISHED}.\n"
    write_text_atomic(out / "table.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="SmolLM2-135M directory (dsee-dist models fetch smollm2 DIR)")
    parser.add_argument("--test", default=str(SHARED_TEXT / "wikitext2-test.txt"))
    parser.add_argument("--valid", default=str(SHARED_TEXT / "wikitext2-valid.txt"), help="calibration text")
    parser.add_argument("--out", default=str(REPO / "results" / "pruning_ppl"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calibration-windows", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=0, help="only the first N test windows (a smoke run)")
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help="comma-separated subset of: " + ", ".join(ALL_ROWS))
    parser.add_argument("--lr", type=float, default=1e-3, help="the tuned rows' learning rate (both methods)")
    parser.add_argument(
        "--micro-batch-size", type=int, default=2, help="tuned rows: blocks of --seq-len per micro-batch"
    )
    parser.add_argument("--grad-accum-steps", type=int, default=2, help="tuned rows: micro-batches per optimizer step")
    parser.add_argument(
        "--tune-steps",
        type=int,
        default=0,
        help="tuned rows: this many optimizer steps per stage instead of one epoch (a smoke run, not a result)",
    )
    parser.add_argument("--keep-models", action="store_true", help="keep the pruned models under OUT/models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[pruning_ppl] %(message)s")
    out = Path(args.out) / ("smoke" if args.max_windows or args.tune_steps else "")
    from dsee_dist.models.loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    test = perplexity.tokenize(tokenizer, perplexity.read_text(Path(args.test)))
    if args.max_windows:
        test = test[: args.max_windows * args.seq_len]
    valid = perplexity.cut_windows(perplexity.tokenize(tokenizer, perplexity.read_text(Path(args.valid))), args.seq_len)
    tokens = {"test": test, "calibration": valid[: args.calibration_windows]}
    for name in args.rows.split(","):
        if name not in ALL_ROWS:
            parser.error(f"unknown row '{name}'; choose from {', '.join(ALL_ROWS)}")
        if row_file(out, name).is_file():
            logger.info(f"{name}: finished before, skipped")
            continue
        row = run_row(name, args, tokens, out)
        write_json(row_file(out, name), row)
        logger.info(f"{name}: perplexity {row['perplexity']:.3f} in {row['wall_s']:.0f} s")
        logger.info("\n" + write_table(out))
    logger.info("\n" + write_table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
