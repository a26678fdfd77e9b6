"""Inference cost of a structurally pruned DSEE model against the dense one, measured in the same run.

    python bench/inference.py [--shape gpt2-large] [--heads 0.25 --mlp 0.25] [--prompt 32 --new-tokens 64]
    python bench/inference.py --dense runs/x/base_model --pruned runs/x/final      # a real run's models
    python bench/inference.py --model smollm2 [--model-dir DIR]                    # the real SmolLM2-135M

Without --dense/--pruned, a GPT-2 of the named built-in shape (random init, 512-token vocabulary so the
transformer blocks dominate as in a large-vocabulary model at long context) gets a DSEE adapter with random
factors, and `dsee_dist.pruning.structured.prune_structured` removes the lowest-scoring heads and MLP
neurons of every layer, exactly as the two-stage recipe does. Both models then generate greedily on CPU
(KV cache on), alternating dense and pruned for each repetition; the median tokens/s is reported for
batch 1 and 8. `--model smollm2` does the same on the real SmolLM2-135M-Instruct (fetched with `dsee-dist
models fetch smollm2` into the user cache unless --model-dir is given; GQA: heads are removed evenly from
its 3 KV groups, 9 -> 6, and 25 % of the SwiGLU neurons), whose export is a stock LlamaForCausalLM.
FLOPs per token come from `dsee_dist.models.flops` (checked against torch's FLOP counter in the tests).

Last line: JSON with `flops_saved` (fraction of the transformer blocks' FLOPs) and `speedup`
(the smaller of the batch-1 and batch-8 throughput ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import exact_generate_seconds  # noqa: E402
from _dsee_model import inject_random_dsee  # noqa: E402

from dsee_dist.config import DSEEConfig, PruneConfig  # noqa: E402
from dsee_dist.dsee.adapter import read_adapter, save_adapter  # noqa: E402
from dsee_dist.engine.process_group import DistInfo  # noqa: E402
from dsee_dist.models.flops import compare, flops_per_token  # noqa: E402
from dsee_dist.models.loading import build_builtin_model  # noqa: E402
from dsee_dist.models.pruned_gpt2 import load_pruned_model  # noqa: E402
from dsee_dist.pruning.structured import prune_structured  # noqa: E402


def build_pair(shape: str, heads: float, mlp: float, workdir: Path) -> tuple[Path, Path]:
    """A dense built-in GPT-2 and its structurally pruned copy (via a random DSEE adapter)."""
    dense = build_builtin_model(shape, vocab_size=512, seed=0)
    dense_dir = workdir / "dense"
    dense.save_pretrained(dense_dir)
    adapted = copy.deepcopy(dense)
    dsee = DSEEConfig(lora_rank=8, lora_alpha=16, num_sparse=64)
    inject_random_dsee(adapted, dsee.lora_rank, dsee.num_sparse)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(("lora_b", "sparse_values")):
                p.normal_(0, 0.02, generator=gen)
    save_adapter(adapted, workdir / "adapter", base_model=str(dense_dir), dsee_cfg=dsee, is_rank_zero=True)
    prune_cfg = PruneConfig(method="structured", head_ratio=heads, mlp_ratio=mlp)
    prune_structured(
        prune_cfg,
        str(dense_dir),
        read_adapter(workdir / "adapter"),
        workdir / "pruned",
        DistInfo(0, 1, 0),
        log=lambda m: print(f"[bench] {m}", flush=True),
    )
    return dense_dir, workdir / "pruned"


def build_smollm2_pair(model_dir: Path | None, heads: float, mlp: float, workdir: Path) -> tuple[Path, Path]:
    """SmolLM2 and its structurally pruned copy (via a random DSEE adapter on its auto q/v targets)."""
    from transformers import AutoModelForCausalLM

    from dsee_dist.dsee.inject import find_targets, inject_dsee
    from dsee_dist.models.fetch import fetch

    dense_dir = (
        Path(model_dir) if model_dir else fetch("smollm2", Path.home() / ".cache" / "dsee_dist" / "models" / "smollm2")
    )
    adapted = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    dsee = DSEEConfig(lora_rank=8, lora_alpha=16, num_sparse=0)
    inject_dsee(
        adapted,
        find_targets(adapted, "auto", "auto"),
        {},
        rank=dsee.lora_rank,
        alpha=dsee.lora_alpha,
        dropout=0.0,
        seed=0,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.02, generator=gen)
    save_adapter(adapted, workdir / "adapter", base_model=str(dense_dir), dsee_cfg=dsee, is_rank_zero=True)
    del adapted
    prune_cfg = PruneConfig(method="structured", head_ratio=heads, mlp_ratio=mlp)
    prune_structured(
        prune_cfg,
        str(dense_dir),
        read_adapter(workdir / "adapter"),
        workdir / "pruned",
        DistInfo(0, 1, 0),
        log=lambda m: print(f"[bench] {m}", flush=True),
    )
    return dense_dir, workdir / "pruned"


def tokens_per_second(model, batch: int, prompt: int, new_tokens: int) -> float:
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    return batch * new_tokens / exact_generate_seconds(model, ids, torch.ones_like(ids), new_tokens, pad_token_id=0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape", default="gpt2-large", help="built-in GPT-2 shape (dsee_dist.config.schema.BUILTIN_MODELS)"
    )
    parser.add_argument("--heads", type=float, default=0.25, help="fraction of heads removed per layer")
    parser.add_argument("--mlp", type=float, default=0.25, help="fraction of MLP neurons removed per layer")
    parser.add_argument(
        "--model",
        choices=["builtin", "smollm2"],
        default="builtin",
        help="builtin: a random GPT-2 of --shape; smollm2: the real SmolLM2-135M-Instruct",
    )
    parser.add_argument("--model-dir", help="with --model smollm2: a directory written by dsee-dist models fetch")
    parser.add_argument("--dense", help="a dense model directory (instead of the built-in pair)")
    parser.add_argument("--pruned", help="its pruned export")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    return parser.parse_args()


def load_pair(args) -> tuple:
    """(dense, pruned) models: --dense/--pruned, or a pair built for --model (in a temporary directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.dense and args.pruned:
            dense_dir, pruned_dir = Path(args.dense), Path(args.pruned)
        elif args.model == "smollm2":
            dense_dir, pruned_dir = build_smollm2_pair(args.model_dir, args.heads, args.mlp, Path(tmp))
        else:
            dense_dir, pruned_dir = build_pair(args.shape, args.heads, args.mlp, Path(tmp))
        dense = load_pruned_model(dense_dir, dtype=torch.float32).eval()
        pruned = load_pruned_model(pruned_dir, dtype=torch.float32).eval()
    return dense, pruned


def speeds(dense, pruned, args) -> dict:
    """Per batch size: median tokens/s of both models (alternating, after a warm-up) and the speedup, one line each."""
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        tokens_per_second(dense, batch, args.prompt, 4)  # warm-up both
        tokens_per_second(pruned, batch, args.prompt, 4)
        runs = {"dense": [], "pruned": []}
        for _ in range(args.repeats):  # alternate, so drift hits both alike
            runs["dense"].append(tokens_per_second(dense, batch, args.prompt, args.new_tokens))
            runs["pruned"].append(tokens_per_second(pruned, batch, args.prompt, args.new_tokens))
        med = {k: statistics.median(v) for k, v in runs.items()}
        results[batch] = {
            "dense_tok_s": round(med["dense"], 2),
            "pruned_tok_s": round(med["pruned"], 2),
            "speedup": round(med["pruned"] / med["dense"], 3),
        }
        print(
            f"[bench] batch {batch}: dense {med['dense']:.1f} tok/s, pruned {med['pruned']:.1f} tok/s, "
            f"speedup {med['pruned'] / med['dense']:.3f}x",
            flush=True,
        )
    return results


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    dense, pruned = load_pair(args)
    context = args.prompt + args.new_tokens // 2  # mean attended length while generating
    f_dense, f_pruned = flops_per_token(dense.config, context), flops_per_token(pruned.config, context)
    saved = compare(f_dense, f_pruned)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("dense", dense), ("pruned", pruned))}
    print(f"[bench] parameters: dense {params['dense']:,}, pruned {params['pruned']:,}")
    print(
        f"[bench] FLOPs per token (context {context}): dense {f_dense['total'] / 1e6:.1f} M, pruned "
        f"{f_pruned['total'] / 1e6:.1f} M; blocks saved {100 * saved['blocks_saved']:.1f}%, "
        f"total saved {100 * saved['total_saved']:.1f}%"
    )
    print(
        f"[bench] torch threads: {torch.get_num_threads()}; prompt {args.prompt}, {args.new_tokens} new tokens, "
        f"median of {args.repeats}"
    )
    results = speeds(dense, pruned, args)
    print(
        json.dumps(
            {
                "flops_saved": round(saved["blocks_saved"], 4),
                "flops_saved_total": round(saved["total_saved"], 4),
                "speedup": min(r["speedup"] for r in results.values()),
                "per_batch": {str(b): r for b, r in results.items()},
                "flops_per_token": {"dense": f_dense["total"], "pruned": f_pruned["total"], "context": context},
                "parameters": params,
                "shape": None if args.dense else (args.model if args.model != "builtin" else args.shape),
            }
        )
    )


if __name__ == "__main__":
    main()
