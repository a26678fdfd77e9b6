"""Decomposition time per matrix (fast vs the reference implementation) and the overlap of their supports.

    python bench/support.py [--threads 1] [--num-sparse 64]

Matrices: GPT-2 small (768 x 768, one q/v slice of c_attn) and medium (1024 x 1024) shapes. No
pretrained GPT-2 is available offline here, so they are synthetic "pretrained-like" matrices: a
low-rank part with decaying spectrum, small dense noise, and 0.3 % sparse outliers (the structure
the decomposition is meant to find). Both algorithms run single-threaded by default (the reference
figure in METHOD.md is one core) with the same seed. `ref_seed_overlap` is the overlap between two
reference runs that differ only in the seed of their random start: no algorithm can agree with
the reference more closely than the reference agrees with itself.

Last line: JSON with `speedup_vs_reference` and `overlap` (the minimum over shapes) and per-shape figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsee_dist.dsee.support import decompose_fast, decompose_reference, top_n_positions  # noqa: E402

SHAPES = {"gpt2-small": (768, 768), "gpt2-medium": (1024, 1024)}


def pretrained_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = 32
    spectrum = torch.logspace(0, -1, rank)
    low = (torch.randn(rows, rank, generator=g) * spectrum) @ torch.randn(rank, cols, generator=g) * (0.05 / rank**0.5)
    noise = torch.randn(rows, cols, generator=g) * 0.002
    n_out = int(0.003 * rows * cols)
    flat = torch.randperm(rows * cols, generator=g)[:n_out]
    outliers = torch.zeros(rows * cols)
    outliers[flat] = (0.05 + 0.25 * torch.rand(n_out, generator=g)) * torch.sign(torch.randn(n_out, generator=g))
    return low + noise + outliers.view(rows, cols)


def support_set(s0: torch.Tensor, n: int) -> set:
    return set(map(tuple, top_n_positions(s0.abs(), n).T.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num-sparse", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name, (rows, cols) in SHAPES.items():
        w = pretrained_like(rows, cols, args.seed)
        t0 = time.perf_counter()
        ref = decompose_reference(w, generator=torch.Generator().manual_seed(1))
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = decompose_fast(w, generator=torch.Generator().manual_seed(1))
        t_fast = time.perf_counter() - t0
        ref_other_seed = decompose_reference(w, generator=torch.Generator().manual_seed(2))
        n = args.num_sparse
        overlap = len(support_set(ref, n) & support_set(fast, n)) / n
        floor = len(support_set(ref, n) & support_set(ref_other_seed, n)) / n
        results[name] = {
            "shape": [rows, cols],
            "reference_s": round(t_ref, 3),
            "fast_s": round(t_fast, 3),
            "speedup": round(t_ref / t_fast, 2),
            "overlap": overlap,
            "ref_seed_overlap": floor,
        }
        print(
            f"{name:12s} {rows}x{cols}: reference {t_ref:6.2f}s  fast {t_fast:5.2f}s  speedup {t_ref / t_fast:5.2f}x  "
            f"overlap(N={n}) {overlap:.3f}  reference-vs-reference(other seed) {floor:.3f}",
            flush=True,
        )
    summary = {
        "speedup_vs_reference": min(r["speedup"] for r in results.values()),
        "overlap": min(r["overlap"] for r in results.values()),
        "threads": args.threads,
        "num_sparse": args.num_sparse,
        "per_shape": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
