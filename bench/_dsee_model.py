"""Shared by the benchmarks: DSEE on the q and v slices of every `c_attn`, on a random support (the
benchmarks measure cost, which does not depend on where the N entries sit)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsee_dist.dsee.inject import find_targets, inject_dsee, mark_only_adapters_trainable  # noqa: E402
from dsee_dist.dsee.support import matrix_generator, select_support  # noqa: E402


def inject_random_dsee(model, rank: int, num_sparse: int, seed: int = 0) -> tuple[list, dict[str, torch.Tensor]]:
    """Wrap the q and v slices with DSEE (alpha = 2r); returns (the trainable parameters, the support)."""
    specs = find_targets(model, ["c_attn"], ["q", "v"])
    support = {
        name: select_support(
            torch.zeros(size, spec.in_features), num_sparse, "random", generator=matrix_generator(seed, name)
        )
        for spec in specs
        for (_, size), name in zip(spec.slices, spec.matrix_names())
    }
    inject_dsee(model, specs, support, rank=rank, alpha=2 * rank, dropout=0.0, seed=seed)
    return mark_only_adapters_trainable(model), support
