"""The one shape description (dsee_dist.models.shape, built from the family data) against the models transformers
builds from the same configs: for every family of the family tests, and a structurally pruned GPT-2 with its own
head count and MLP width per layer, the projections it lists are the model's linear layers (names, sizes,
biases), their parameters add up to the model's, and so do all parameters."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsee_dist.models.shape import linear_modules, linear_parameter_count, model_shape, parameter_count
from tests.unit.models.family_models import FAMILY_MODELS, _config


def _pruned_gpt2_config():
    from dsee_dist.models.pruned_gpt2 import PrunedGPT2Config, register

    register()
    return PrunedGPT2Config(
        heads_per_layer=[3, 1], inner_per_layer=[40, 72], head_dim=8, n_layer=2, n_embd=32, n_head=4, n_positions=64
    )


CONFIGS = {kind: lambda kind=kind: _config(kind) for kind in FAMILY_MODELS} | {"pruned_gpt2": _pruned_gpt2_config}


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _projections(model) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_listed_projections_are_the_models_linear_layers(kind):
    config = CONFIGS[kind]()
    model = _meta_model(config)
    real = _projections(model)
    listed = {m.name: m for m in linear_modules(model_shape(config))}
    assert sorted(listed) == sorted(real)
    for name, module in real.items():
        out_in = module.weight.shape[::-1] if isinstance(module, Conv1D) else module.weight.shape
        assert (listed[name].out_features, listed[name].in_features) == tuple(out_in), name
        assert listed[name].bias == (module.bias is not None), name


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_parameter_counts_equal_the_models(kind):
    config = CONFIGS[kind]()
    model = _meta_model(config)
    shape = model_shape(config)
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}  # a tied LM head is counted there
    linear = {id(p): p.numel() for m in _projections(model).values() for p in m.parameters() if id(p) not in embeddings}
    assert linear_parameter_count(shape) == sum(linear.values())
    assert parameter_count(shape) == sum(p.numel() for p in model.parameters())
