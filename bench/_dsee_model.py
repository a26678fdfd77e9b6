"""Shared by the benchmarks: DSEE on a random support (the benchmarks measure cost, which does not depend on where
the N entries sit), by default on the q and v slices of every GPT-2 `c_attn`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsee_dist.dsee.inject import find_targets, inject_dsee, mark_only_adapters_trainable  # noqa: E402
from dsee_dist.dsee.support import matrix_generator, select_support  # noqa: E402


def inject_random_dsee(
    model, rank: int, num_sparse: int, seed: int = 0, targets=("c_attn",), fused_slices=("q", "v")
) -> tuple[list, dict[str, torch.Tensor]]:
    """Wrap every matrix of `targets` (by default the q and v slices of GPT-2's fused `c_attn`; `fused_slices=[]`
    adapts each target whole) with DSEE (alpha = 2r) on a random support of `num_sparse` entries; returns (the
    trainable parameters, the support)."""
    specs = find_targets(model, list(targets), list(fused_slices))
    support = {
        name: select_support(
            torch.zeros(rows[1], spec.in_features), num_sparse, "random", generator=matrix_generator(seed, name)
        )
        for spec in specs
        for rows, name in zip(spec.slices, spec.matrix_names())
    }
    inject_dsee(model, specs, support, rank=rank, alpha=2 * rank, dropout=0.0, seed=seed)
    return mark_only_adapters_trainable(model), support
