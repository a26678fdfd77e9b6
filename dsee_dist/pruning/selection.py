"""The exact k lowest scores of a group of matrices whose scores are spread over ranks.

Each rank holds the scores of the matrices it owns (none of another rank's). The k-th smallest score
is found by a radix select on the bit patterns of the non-negative fp32 scores (which order like the
values): four passes, each all-reducing one 256-bin histogram. Entries below it are pruned; of the
entries equal to it, the first ones in the global (matrix order, flat index) order fill the count
exactly. The result is the same at any world size and equals a single-process sort.
"""

from __future__ import annotations

import torch

from dsee_dist.engine import process_group


def _keys(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.detach().to(torch.float32).contiguous().flatten()
    if scores.numel() and float(scores.min()) < 0:
        raise ValueError("pruning scores must be non-negative")
    return scores.view(torch.int32)


def kth_smallest_key(local: list[torch.Tensor], k: int) -> int:
    """Bit pattern of the k-th smallest (1-based) of all ranks' keys together. Collective."""
    prefix = 0
    remaining = k
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.int64)
        for keys in local:
            selected = keys if shift == 24 else keys[(keys >> (shift + 8)) == (prefix >> (shift + 8))]
            if selected.numel():
                hist += torch.bincount(((selected >> shift) & 255).long(), minlength=256)
        hist = process_group.all_reduce_tensor(hist)
        cumulative = hist.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(remaining), right=False))
        remaining -= int(cumulative[digit - 1]) if digit > 0 else 0
        prefix |= digit << shift
    return prefix


def lowest_k_masks(local_scores: dict[str, torch.Tensor], order: list[str], k: int) -> dict[str, torch.Tensor]:
    """For each local matrix, a bool tensor (its shape) that is True on the pruned entries, so that exactly
    k entries of the whole group (all ranks) are pruned. `order` lists every matrix of the group, on every
    rank the same. Collective: every rank calls it, also with no local matrices."""
    names = [n for n in order if n in local_scores]
    if k <= 0:
        return {n: torch.zeros_like(local_scores[n], dtype=torch.bool) for n in names}
    keys = {n: _keys(local_scores[n]) for n in names}
    (total,) = process_group.all_reduce_sum([sum(k.numel() for k in keys.values())])
    if k > total:
        raise ValueError(f"cannot prune {k} entries of a group of {int(total)}")
    threshold = kth_smallest_key([keys[n] for n in names], k)
    below = {n: keys[n] < threshold for n in names}
    equal_counts = {n: int((keys[n] == threshold).sum()) for n in names}
    (n_below,) = process_group.all_reduce_sum([sum(int(b.sum()) for b in below.values())])
    counts: dict[str, int] = {}
    for part in process_group.all_gather_object(equal_counts):
        counts.update(part)
    quota = k - int(n_below)
    masks = {}
    for name in order:
        take = min(counts.get(name, 0), max(quota, 0))
        quota -= take
        if name in keys:
            pruned = below[name].clone()
            if take:
                ties = torch.nonzero(keys[name] == threshold).flatten()[:take]
                pruned[ties] = True
            masks[name] = pruned.view(local_scores[name].shape)
    return masks
