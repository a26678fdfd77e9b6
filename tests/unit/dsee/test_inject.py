"""Target matching, injection and freezing (a PEFT-style table of cases)."""

import pytest
import torch

from dsee_dist.dsee.inject import (
    check_num_sparse,
    count_parameters,
    count_prune_mask_entries,
    find_targets,
    inject_dsee,
    mark_only_adapters_trainable,
    parameter_summary,
)
from dsee_dist.dsee.layer import DSEELayer
from dsee_dist.errors import ConfigError
from tests.conftest import tiny_gpt2, tiny_llama

# (model, target_modules, fused_slices, exclude, expected adapted matrices)
TEST_CASES = [
    (
        "gpt2",
        ["c_attn"],
        ["q", "v"],
        [],
        [
            "transformer.h.0.attn.c_attn.q",
            "transformer.h.0.attn.c_attn.v",
            "transformer.h.1.attn.c_attn.q",
            "transformer.h.1.attn.c_attn.v",
        ],
    ),
    ("gpt2", ["c_attn"], [], [], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    ("gpt2", ["c_attn"], ["k"], ["re:.*h\\.0\\..*"], ["transformer.h.1.attn.c_attn.k"]),
    (
        "gpt2",
        ["attn.c_proj", "c_fc"],
        ["q"],
        [],
        [
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc",
            "transformer.h.1.attn.c_proj",
            "transformer.h.1.mlp.c_fc",
        ],
    ),
    ("gpt2", ["re:transformer\\.h\\.1\\.mlp\\.c_proj"], [], [], ["transformer.h.1.mlp.c_proj"]),
    (
        "llama",
        ["q_proj", "v_proj"],
        ["q", "v"],
        [],
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ],
    ),
]


def _model(kind):
    return tiny_gpt2() if kind == "gpt2" else tiny_llama()


@pytest.mark.parametrize("kind,targets,slices,exclude,expected", TEST_CASES)
def test_target_matching(kind, targets, slices, exclude, expected):
    specs = find_targets(_model(kind), targets, slices, exclude)
    assert [m for s in specs for m in s.matrix_names()] == expected


def test_fused_slices_are_the_q_k_v_thirds():
    (spec, *_) = find_targets(tiny_gpt2(), ["c_attn"], ["q", "v"])
    assert spec.slices == ((0, 32), (64, 32)) and spec.slice_names == ("q", "v")


def test_no_match_is_an_error_listing_layer_names():
    with pytest.raises(ConfigError, match="match no adaptable module.*c_attn"):
        find_targets(tiny_gpt2(), ["q_proj"], [])


def test_matching_a_non_linear_module_is_an_error():
    with pytest.raises(ConfigError, match="not adaptable: transformer.h.0.ln_1"):
        find_targets(tiny_gpt2(), ["ln_1"], [])


def test_num_sparse_larger_than_matrix_is_an_error():
    specs = find_targets(tiny_gpt2(), ["c_attn"], ["q"])
    with pytest.raises(ConfigError, match="larger than the 32 x 32 matrix"):
        check_num_sparse(specs, 32 * 32 + 1)


def test_everything_but_adapters_is_frozen_and_counted():
    model = tiny_gpt2()
    total_before = sum(p.numel() for p in model.parameters())
    specs = find_targets(model, ["c_attn"], ["q", "v"])
    support = {m: torch.tensor([[0, 1], [2, 3]]) for s in specs for m in s.matrix_names()}
    layers = inject_dsee(model, specs, support, rank=2, alpha=4, dropout=0.0, seed=0)
    trainable = mark_only_adapters_trainable(model)
    assert all(isinstance(model.get_submodule(n), DSEELayer) for n in layers)
    per_layer = 2 * 2 * 32 + 2 * 32 * 2 + 2 * 2  # A (2 slices x r x in) + B + 4 sparse values
    assert sum(p.numel() for p in trainable) == 2 * per_layer
    assert count_parameters(model) == (2 * per_layer, total_before + 2 * per_layer)
    assert "4 sparse values" not in parameter_summary(model) and "(8 sparse values)" in parameter_summary(model)


def test_keep_masks_are_not_counted_as_model_parameters():
    model = tiny_gpt2()
    specs = find_targets(model, ["c_attn"], ["q", "v"])
    layers = inject_dsee(model, specs, {}, rank=2, alpha=4, dropout=0.0, seed=0)
    mark_only_adapters_trainable(model)
    before = count_parameters(model)
    layer = next(iter(layers.values()))
    keep = torch.ones(len(layer.slices), layer.slice_size, layer.in_features, dtype=torch.bool)
    keep[0, :, :8] = False  # 32 rows x 8 columns of the q slice pruned
    layer.attach_prune_mask(keep)
    assert count_parameters(model) == before
    mask_total = 2 * 32 * 32
    assert count_prune_mask_entries(model) == (mask_total - 32 * 8, mask_total)
    summary = parameter_summary(model)
    assert f"of {before[1]:,} " in summary
    assert f"keep masks over {mask_total:,} adapted weights (not counted above), {mask_total - 256:,} kept" in summary


def test_adapter_init_is_identical_for_the_same_seed_and_name():
    a, b = tiny_gpt2(seed=0), tiny_gpt2(seed=1)  # different base weights and RNG history
    torch.manual_seed(123)
    la = inject_dsee(a, find_targets(a, ["c_attn"], ["q"]), {}, rank=2, alpha=4, dropout=0.0, seed=7)
    torch.manual_seed(456)
    lb = inject_dsee(b, find_targets(b, ["c_attn"], ["q"]), {}, rank=2, alpha=4, dropout=0.0, seed=7)
    for name in la:
        assert torch.equal(la[name].lora_a, lb[name].lora_a)
