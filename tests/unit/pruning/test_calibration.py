"""Calibration norms for activation-aware pruning: the inputs the stage-1 model really sees, padding excluded."""

import torch

from dsee_dist.data.dataset import IGNORE_INDEX, TokenizedSplit
from dsee_dist.dsee.adapter import load_adapted_model
from dsee_dist.pruning.calibration import calibration_indices, held_fraction, input_norms
from tests.unit.pruning.helpers import SINGLE, stage1_outputs

MODULES = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]


def _split(lengths, vocab=97, seed=3) -> TokenizedSplit:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    return TokenizedSplit(ids, [torch.full_like(x, IGNORE_INDEX) for x in ids])


def _norms(adapter_dir, base_dir, split, batch_size, num_examples=8, lockstep=False):
    model = load_adapted_model(adapter_dir, str(base_dir))
    return input_norms(
        model,
        MODULES,
        split,
        0,
        SINGLE,
        num_examples=num_examples,
        batch_size=batch_size,
        device=torch.device("cpu"),
        lockstep=lockstep,
    )


def test_norms_are_the_stage1_inputs_over_real_tokens_only(tmp_path):
    base_dir, adapter_dir, _, adapted = stage1_outputs(tmp_path)
    split = _split([5, 9, 3, 7, 6, 4, 8, 2])  # 8 examples, all calibrate
    one_by_one = _norms(adapter_dir, base_dir, split, batch_size=1)  # no padding at all
    padded = _norms(adapter_dir, base_dir, split, batch_size=3)  # right-padded batches
    for name in MODULES:
        torch.testing.assert_close(padded[name], one_by_one[name], rtol=1e-5, atol=1e-6)
    # by hand: layer 0's c_attn reads ln_1 of the embeddings; layer 1's c_proj the GELU of the adapted model's c_fc
    expected_attn, expected_proj = torch.zeros(32), torch.zeros(128)
    with torch.no_grad():
        for ids in split.input_ids[:8]:
            h = adapted.transformer.wte(ids) + adapted.transformer.wpe(torch.arange(len(ids)))
            expected_attn += adapted.transformer.h[0].ln_1(h).square().sum(dim=0)
            hidden = adapted(ids[None], output_hidden_states=True).hidden_states[1]
            block = adapted.transformer.h[1]
            attn_out = block.attn(block.ln_1(hidden))[0]
            mlp_in = block.ln_2(hidden + attn_out)
            expected_proj += block.mlp.act(block.mlp.c_fc(mlp_in))[0].square().sum(dim=0)
    torch.testing.assert_close(one_by_one[MODULES[0]], expected_attn.sqrt(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one_by_one[MODULES[1]], expected_proj.sqrt(), rtol=1e-4, atol=1e-5)
    # the lockstep rounds of ZeRO-3 add nothing for a single rank
    for name, norm in _norms(adapter_dir, base_dir, split, batch_size=3, lockstep=True).items():
        torch.testing.assert_close(norm, padded[name])
    assert held_fraction(adapted) == 1.0  # a whole model
    # fewer examples: smaller sums (the count is honoured)
    assert float(_norms(adapter_dir, base_dir, split, 2, num_examples=4)[MODULES[0]].sum()) < float(
        one_by_one[MODULES[0]].sum()
    )


def test_calibration_examples_are_spread_over_the_split():
    assert calibration_indices(5, 20) == [0, 4, 8, 12, 16]  # spread over the split
    assert calibration_indices(50, 10) == list(range(10))  # never past the split
