"""Pruning scores. Element scores rank entries for unstructured pruning; head and neuron scores rank
whole attention heads and MLP neurons for structured pruning.

Element scores (METHOD.md §3, after the reference's --prune_mode):
- `delta`  (reference ABS): |ΔW| for adapted matrices, |W0| for non-adapted ones;
- `merged` (WABS): |W0 + ΔW|;
- `base`: |W0|;
- `activation` (Wanda, Sun et al. 2023): |W0 + ΔW| times the L2 norm of each input feature over calibration
  examples (`calibration.input_norms`), so a weight that multiplies a large input counts for more;
- `random`: uniform noise drawn from a generator seeded by (seed, matrix name), so every rank and
  world size draws the same numbers.

Head and neuron scores (`prune.head_score`): `delta` and `delta+base` sum weights over a head's q and v rows
and a neuron's input rows and output column; `activation` (structured Wanda) scores what a head or neuron
writes: the columns of the attention-output or MLP-output projection it feeds, |W0 + ΔW| times the
calibration norm of that column's input (`output_column_scores`).
"""

from __future__ import annotations

import torch

from dsee_dist.dsee.support import matrix_generator

ELEMENT_SCORES = ("delta", "merged", "base", "activation", "random")
HEAD_SCORES = ("delta", "delta+base", "activation")


def element_scores(
    score: str,
    w0: torch.Tensor,
    delta: torch.Tensor | None,
    *,
    seed: int,
    name: str,
    input_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-negative fp32 scores, the shape of w0 (out x in); lower = pruned first. `input_norm` (in,): the
    calibration norms of the matrix's input features, required by `activation`."""
    if score == "random":
        return torch.rand(w0.shape, generator=matrix_generator(seed, name + ".prune"), dtype=torch.float32)
    w0 = w0.float()
    if delta is None or score == "base":
        values = w0.abs()
    elif score == "delta":
        values = delta.float().abs()
    elif score in ("merged", "activation"):
        values = (w0 + delta.float()).abs()
    else:
        raise ValueError(f"unknown element score '{score}'")
    if score == "activation":
        if input_norm is None:
            raise ValueError(f"score 'activation' needs the input norms of '{name}'")
        values = values * input_norm.float().view(1, -1)
    return values + 0.0  # -0.0 -> +0.0: the bit patterns of non-negative floats sort like the values


def head_scores(q_w0, v_w0, q_delta, v_delta, head_dim: int, score: str, group: int = 1) -> torch.Tensor:
    """Per query head: sum over its rows of |ΔW_q| + |ΔW_v| (|W0| where a slice is not adapted), plus |W0_q| +
    |W0_v| for `delta+base`. Inputs are head-major (width x in) row blocks of q and v; under grouped-query
    attention v has one head per `group` query heads, and each query head counts the value head it reads."""

    def rows_abs(w0, delta):
        total = (delta if delta is not None else w0).float().abs().sum(dim=1)
        if score == "delta+base" and delta is not None:
            total = total + w0.float().abs().sum(dim=1)
        return total.view(-1, head_dim).sum(dim=1)

    return rows_abs(q_w0, q_delta) + rows_abs(v_w0, v_delta).repeat_interleave(group)


def neuron_scores(fc_w0, proj_w0, fc_delta, proj_delta, score: str, extra_rows=()) -> torch.Tensor:
    """Per MLP neuron j: |row j of the input projection| + |column j of the output projection|, using ΔW where
    that module is adapted (plus |W0| for `delta+base`), W0 otherwise; `extra_rows`: more (w0, delta) input
    projections whose row j belongs to neuron j (the SwiGLU gate). fc: (inner x d), proj: (d x inner)."""
    total = torch.zeros(fc_w0.shape[0], dtype=torch.float32)
    for w0, delta, dim in ((fc_w0, fc_delta, 1), (proj_w0, proj_delta, 0), *((w, d, 1) for w, d in extra_rows)):
        total += (delta if delta is not None else w0).float().abs().sum(dim=dim)
        if score == "delta+base" and delta is not None:
            total += w0.float().abs().sum(dim=dim)
    return total


def output_column_scores(
    w0: torch.Tensor, delta: torch.Tensor | None, input_norm: torch.Tensor, width: int
) -> torch.Tensor:
    """Per block of `width` consecutive input columns of an output projection (out x in; a head's columns of
    the attention output, width head_dim; a neuron's column of the MLP output, width 1): the sum over the
    block of |W0 + ΔW| times each column's calibration input norm."""
    w = w0.float() if delta is None else w0.float() + delta.float()
    per_column = w.abs().sum(dim=0) * input_norm.float()
    return per_column.view(-1, width).sum(dim=1)


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k lowest scores, ties broken by index (sorted ascending)."""
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return sorted(order[:k])
