"""The global k-smallest selection against a plain sort over all matrices."""

import pytest
import torch

from dsee_dist.pruning.selection import lowest_k_masks


def _scores(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.rand(6, 9, generator=g),
        "b": torch.rand(5, 4, generator=g).mul(10).round() / 10,  # many ties
        "c": torch.zeros(3, 3),  # all tied at zero
        "d": torch.rand(2, 7, generator=g) * 1e-30,  # subnormal-small values
    }


@pytest.mark.parametrize("k", [0, 1, 7, 9, 30, 60, 97])
def test_exactly_k_entries_pruned_and_they_are_the_lowest(k):
    scores = _scores(k)
    order = list(scores)
    masks = lowest_k_masks(scores, order, k)
    assert sum(int(m.sum()) for m in masks.values()) == k
    flat = torch.cat([scores[n].flatten() for n in order])
    pruned = torch.cat([masks[n].flatten() for n in order])
    if 0 < k < flat.numel():
        assert float(flat[pruned].max()) <= float(flat[~pruned].min())
    # the same set as a stable sort over (value, global position)
    expected = torch.zeros_like(pruned)
    expected[torch.sort(flat, stable=True).indices[:k]] = True
    assert torch.equal(pruned, expected)


def test_more_than_the_group_is_refused():
    with pytest.raises(ValueError, match="cannot prune 98 entries of a group of 97"):
        lowest_k_masks(_scores(0), list(_scores(0)), 98)


def test_negative_scores_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        lowest_k_masks({"a": -torch.ones(2, 2)}, ["a"], 1)
