"""Element, head and neuron scores by their definitions; the FLOPs formula against torch's FLOP counter."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from dsee_dist.models.flops import compare, flops_per_token
from dsee_dist.models.pruned_gpt2 import PrunedGPT2Config, PrunedGPT2LMHeadModel
from dsee_dist.pruning.scores import element_scores, head_scores, lowest, neuron_scores, output_column_scores


def test_element_scores_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    w0, delta = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    assert torch.equal(element_scores("delta", w0, delta, seed=0, name="m"), delta.abs())
    assert torch.equal(element_scores("delta", w0, None, seed=0, name="m"), w0.abs())  # not adapted: |W0|
    assert torch.equal(element_scores("merged", w0, delta, seed=0, name="m"), (w0 + delta).abs())
    assert torch.equal(element_scores("base", w0, delta, seed=0, name="m"), w0.abs())
    r1 = element_scores("random", w0, delta, seed=3, name="m")
    assert torch.equal(r1, element_scores("random", w0, None, seed=3, name="m"))  # same on every rank
    assert not torch.equal(r1, element_scores("random", w0, delta, seed=3, name="other"))


def test_head_and_neuron_scores_sum_the_right_rows_and_columns():
    g = torch.Generator().manual_seed(1)
    q0, v0, qd, vd = (torch.randn(8, 6, generator=g) for _ in range(4))
    scores = head_scores(q0, v0, qd, vd, head_dim=2, score="delta")
    for h in range(4):
        rows = slice(2 * h, 2 * h + 2)
        assert torch.isclose(scores[h], qd[rows].abs().sum() + vd[rows].abs().sum())
    with_base = head_scores(q0, v0, qd, vd, head_dim=2, score="delta+base")
    assert torch.isclose(with_base[1], scores[1] + q0[2:4].abs().sum() + v0[2:4].abs().sum())
    fc, proj = torch.randn(10, 6, generator=g), torch.randn(6, 10, generator=g)
    n = neuron_scores(fc, proj, None, None, "delta")
    assert torch.isclose(n[3], fc[3].abs().sum() + proj[:, 3].abs().sum())
    assert lowest(torch.tensor([3.0, 1.0, 1.0, 0.5]), 2) == [1, 3]  # ties: the lower index goes first


def test_output_column_scores_weigh_each_column_by_its_input_norm():
    g = torch.Generator().manual_seed(2)
    w0, delta, norm = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), torch.rand(6, generator=g)
    per_head = output_column_scores(w0, delta, norm, width=2)  # 3 heads of 2 columns
    for h in range(3):
        cols = slice(2 * h, 2 * h + 2)
        assert torch.isclose(per_head[h], ((w0 + delta)[:, cols].abs() * norm[cols]).sum())
    per_neuron = output_column_scores(w0, None, norm, width=1)
    assert torch.allclose(per_neuron, w0.abs().sum(dim=0) * norm)


def _counted_flops(model, seq: int) -> int:
    x = torch.randint(0, model.config.vocab_size, (1, seq))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_flops_per_token_matches_torch_flop_counter_dense_and_pruned():
    config = PrunedGPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=50,
        n_positions=64,
        heads_per_layer=[3, 2],
        inner_per_layer=[96, 64],
        attn_implementation="eager",
    )
    dense_config = PrunedGPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=64, attn_implementation="eager"
    )
    seq = 16
    for cfg in (config, dense_config):
        model = PrunedGPT2LMHeadModel(cfg).eval()
        # eager attention does the full seq x seq products: each token attends to `seq` positions
        assert _counted_flops(model, seq) == seq * flops_per_token(cfg, context=seq)["total"]


def test_quarter_of_heads_and_neurons_saves_a_quarter_of_block_flops():
    dense = PrunedGPT2Config(n_layer=12, n_embd=768, n_head=12)
    pruned = PrunedGPT2Config(n_layer=12, n_embd=768, n_head=12, heads_per_layer=[9] * 12, inner_per_layer=[2304] * 12)
    saved = compare(flops_per_token(dense), flops_per_token(pruned))
    assert abs(saved["blocks_saved"] - 0.25) < 1e-12
    assert 0 < saved["total_saved"] < saved["blocks_saved"]  # the LM head is not pruned
