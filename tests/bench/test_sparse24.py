"""bench/sparse24.py on CPU: its 2:4 weights are the ones `prune.pattern: 2:4` keeps, its pattern check refuses
what is not 2:4, and without a GPU it says the figures are unmeasured and writes nothing."""

import torch

from bench import sparse24
from dsee_dist.pruning.unstructured import lowest_per_group_of_m


def test_the_benchmarks_2_4_weights_are_what_prune_pattern_keeps():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    kept = sparse24.keep_2_4(w)
    pruned = lowest_per_group_of_m(w.abs(), 2, 4)  # the product's N:M choice on |W| (magnitude)
    assert torch.equal(kept, w.masked_fill(pruned, 0))
    assert sparse24.is_2_4(kept) and not sparse24.is_2_4(w)
    three_of_four = kept.clone()
    three_of_four[5, 8:12] = 1.0
    assert not sparse24.is_2_4(three_of_four) and not sparse24.is_2_4(torch.zeros(4, 6))


def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sparse24.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out and not (tmp_path / "out").exists()
