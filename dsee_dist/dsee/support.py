"""Choosing the sparse support Omega of S from one pretrained matrix (METHOD.md §2).

Pure tensor code: which rank decomposes which matrix, and gathering partitioned weights, are
decided in `dsee/placement.py`. Every function is deterministic for a given generator.

The decomposition is the greedy bilateral sparse + low-rank method of the reference code:

    V <- random 1 x in
    repeat outer_iters times (rank grows by rank_step):
        S0 <- 0
        repeat inner_iters times:
            U <- orthonormal basis of (W0 - S0) V^T;  V <- U^T (W0 - S0)
            S0 <- W0 - U V with entries below `threshold` zeroed
        E <- W0 - U V - S0;  V <- [V; first rank_step rows of R], E = Q R
    Omega <- positions of the N largest |S0|

`decompose_reference` is that loop step for step. `decompose_fast` is the same algorithm made
cheaper in two ways:
1. The first k rows of R in E = QR equal Q_k^T E with Q_k an orthonormal basis of E's first k
   columns, so a thin QR of an (n x k) block replaces the full (n x m) QR every outer step
   (exact, up to the signs of those rows, which do not change the subspace).
2. The rank grows in steps about `speedup` times larger over `speedup` times fewer outer
   iterations (at least two), reaching the rank the reference uses in its last iteration.
   bench/support.py measures the time saved and the overlap of the supports picked by both.
The rank is capped at 2/3 of the smaller dimension (501 of 768 for GPT-2 small, as in the
reference), so small matrices do not collapse to a zero residual.
"""

from __future__ import annotations

import math
import zlib

import torch

FAST_SCHEDULE_SPEEDUP = 5


def matrix_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from the job seed and the matrix name, so the result does not depend on
    which rank computes it, on the world size, or on what else consumed random numbers."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _max_rank(shape: tuple[int, int], rank_step: int, outer_iters: int) -> int:
    return max(1, min(1 + rank_step * outer_iters, (2 * min(shape)) // 3))


def _hard_threshold(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x.abs() < threshold, torch.zeros_like(x), x)


def decompose_reference(
    weight: torch.Tensor,
    *,
    rank_step: int = 5,
    outer_iters: int = 100,
    inner_iters: int = 2,
    threshold: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The reference loop, straightforwardly (full QR of the residual every outer step). Returns S0."""
    w = weight.detach().to(torch.float32)
    max_rank = _max_rank(tuple(w.shape), rank_step, outer_iters)
    v = torch.randn(1, w.shape[1], generator=generator).to(w.device)
    s = torch.zeros_like(w)
    for _ in range(outer_iters):
        s = torch.zeros_like(w)
        for _ in range(inner_iters):
            u, _ = torch.linalg.qr((w - s) @ v.T)
            v = u.T @ (w - s)
            s = _hard_threshold(w - u @ v, threshold)
        if v.shape[0] >= max_rank:
            break
        e = w - u @ v - s
        _, r = torch.linalg.qr(e)
        v = torch.cat([v, r[: min(rank_step, max_rank - v.shape[0])]], dim=0)
    return s


def decompose_fast(
    weight: torch.Tensor,
    *,
    rank_step: int = 5,
    outer_iters: int = 100,
    inner_iters: int = 2,
    threshold: float = 0.01,
    generator: torch.Generator | None = None,
    speedup: int = FAST_SCHEDULE_SPEEDUP,
) -> torch.Tensor:
    """Same algorithm, thin QR for the new rows and a `speedup`-times coarser rank schedule. Returns S0."""
    w = weight.detach().to(torch.float32)
    max_rank = _max_rank(tuple(w.shape), rank_step, outer_iters)
    # Fewer outer iterations, reaching the rank the reference uses in its last one.
    final_rank = min(max_rank, 1 + (outer_iters - 1) * rank_step)
    iters = max(min(outer_iters, 2), math.ceil(outer_iters / speedup))
    step = max(1, math.ceil((final_rank - 1) / max(1, iters - 1)))
    v = torch.randn(1, w.shape[1], generator=generator).to(w.device)
    s = torch.zeros_like(w)
    for _ in range(iters):
        s = torch.zeros_like(w)
        for _ in range(inner_iters):
            residual_target = w - s
            u, _ = torch.linalg.qr(residual_target @ v.T)
            v = u.T @ residual_target
            low_rank_residual = w - u @ v
            s = _hard_threshold(low_rank_residual, threshold)
        if v.shape[0] >= final_rank:
            break
        e = low_rank_residual - s
        k = min(step, final_rank - v.shape[0])
        probe = torch.randn(e.shape[1], k, generator=generator).to(e.device)
        q_k, _ = torch.linalg.qr(e @ probe)  # randomized range finder: E's dominant k directions
        v = torch.cat([v, q_k.T @ e], dim=0)
    return s


def top_n_positions(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(2, n) long tensor of (row, col) of the n largest scores, in row-major order.

    Ties are broken by position (stable), so the result is deterministic."""
    flat = scores.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:n]
    order = torch.sort(order).values
    cols = scores.shape[1]
    return torch.stack([order // cols, order % cols])


def select_support(
    weight: torch.Tensor,
    num_sparse: int,
    method: str,
    *,
    generator: torch.Generator,
    rank_step: int = 5,
    outer_iters: int = 100,
    inner_iters: int = 2,
    threshold: float = 0.01,
    algorithm: str = "fast",
) -> torch.Tensor:
    """Positions (2 x N, row-major, rows/cols of the (out x in) `weight`) for the sparse update."""
    rows, cols = weight.shape
    if num_sparse > rows * cols:
        raise ValueError(f"num_sparse={num_sparse} is larger than the {rows} x {cols} matrix")
    if num_sparse == 0:
        return torch.zeros(2, 0, dtype=torch.long)
    if method == "magnitude":
        return top_n_positions(weight.detach().float().abs(), num_sparse)
    if method == "random":
        flat = torch.randperm(rows * cols, generator=generator)[:num_sparse]
        flat = torch.sort(flat).values
        return torch.stack([flat // cols, flat % cols])
    if method == "decomposition":
        decompose = decompose_fast if algorithm == "fast" else decompose_reference
        s0 = decompose(
            weight,
            rank_step=rank_step,
            outer_iters=outer_iters,
            inner_iters=inner_iters,
            threshold=threshold,
            generator=generator,
        )
        return top_n_positions(s0.abs().cpu(), num_sparse)
    raise ValueError(f"unknown support method '{method}'")
