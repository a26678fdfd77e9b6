"""Every decoder family through the same checks: `auto` targets, exactness at step 0, training, the FLOPs
formula against torch's counter, and GPT-NeoX's interleaved q/k/v rows against the model's own split."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsee_dist.dsee.inject import find_targets, inject_dsee, mark_only_adapters_trainable
from dsee_dist.dsee.layer import slice_rows
from dsee_dist.errors import ConfigError
from dsee_dist.models.families import family_of
from dsee_dist.models.flops import compare, flops_per_token
from dsee_dist.models.shape import model_shape
from tests.unit.models.family_models import FAMILY_MODELS, _config, batch, magnitude_support, tiny_model

AUTO_MATRICES = {  # layer 0's adapted matrices under dsee.target_modules=auto
    "gpt2": ["transformer.h.0.attn.c_attn.q", "transformer.h.0.attn.c_attn.v"],
    "llama_gqa": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
    "mistral": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
    "qwen2": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
    "opt": ["model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.v_proj"],
    "gpt_neox": ["gpt_neox.layers.0.attention.query_key_value.q", "gpt_neox.layers.0.attention.query_key_value.v"],
}


def _adapted(kind, num_sparse=4):
    base = tiny_model(kind)
    model = copy.deepcopy(base)
    specs = find_targets(model, "auto", "auto")
    inject_dsee(model, specs, magnitude_support(model, specs, num_sparse), rank=4, alpha=8, dropout=0.0, seed=0)
    return base, model, specs


@pytest.mark.parametrize("kind", FAMILY_MODELS)
def test_auto_targets_are_the_family_q_and_v(kind):
    _, _, specs = _adapted(kind)
    names = [m for s in specs for m in s.matrix_names()]
    assert sorted(n for n in names if ".0." in n) == AUTO_MATRICES[kind] and len(names) == 4  # 2 layers


@pytest.mark.parametrize("kind", FAMILY_MODELS)
def test_zero_update_reproduces_the_base_logits(kind):
    base, model, _ = _adapted(kind)
    x = batch()
    assert torch.equal(model(x).logits, base(x).logits)


@pytest.mark.parametrize("kind", FAMILY_MODELS)
def test_training_the_adapters_lowers_the_loss(kind):
    _, model, _ = _adapted(kind)
    model.train()
    params = mark_only_adapters_trainable(model)
    optimizer = torch.optim.Adam(params, lr=5e-2)
    x = batch(1, (4, 16))
    losses = []
    for _ in range(10):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def _counted_flops(model, seq: int) -> int:
    x = batch(0, (1, seq))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def _pruned_config(kind):
    """The family's own config with fewer heads (where it can say so) and a narrower MLP."""
    config = _config(kind)
    shape = model_shape(config)
    if kind in ("llama_gqa", "llama", "mistral", "qwen2"):
        config.head_dim = shape.head_dim
        config.num_attention_heads = shape.heads[0] - shape.kv_heads[0] if shape.heads[0] > shape.kv_heads[0] else 3
        config.num_key_value_heads = shape.kv_heads[0] if shape.heads[0] > shape.kv_heads[0] else 3
    setattr(config, shape.family.inner_key or "n_inner", 48)
    return config


@pytest.mark.parametrize("kind", FAMILY_MODELS)
def test_flops_per_token_matches_torch_flop_counter_dense_and_pruned(kind):
    from transformers import AutoModelForCausalLM

    seq = 12
    for config in (_config(kind), _pruned_config(kind)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        # eager attention does the full seq x seq products: each token attends to `seq` positions
        assert _counted_flops(model, seq) == seq * flops_per_token(config, context=seq)["total"]
    assert compare(flops_per_token(_config(kind)), flops_per_token(_pruned_config(kind)))["blocks_saved"] > 0


def test_gqa_and_swiglu_terms():
    config = _config("llama_gqa")  # d 72, 9 heads of 8, 3 KV heads, SwiGLU 96
    block = flops_per_token(config, context=5)["blocks"][0]
    assert block == {
        "qkv": 2 * 72 * (72 + 2 * 24),
        "attention": 4 * 72 * 5,
        "attn_out": 2 * 72 * 72,
        "mlp": 3 * 2 * 72 * 96,
        "total": sum(v for k, v in block.items() if k != "total"),
    }


def test_neox_q_k_v_slices_are_the_rows_the_attention_reads():
    model = tiny_model("gpt_neox")
    (spec, *_) = find_targets(model, "auto", ["q", "k", "v"])
    qkv = model.gpt_neox.layers[0].attention.query_key_value
    hidden = torch.randn(1, 3, 32)
    out = qkv(hidden)
    # transformers' GPT-NeoX: view as (..., heads, 3 * head_size), then chunk into q, k, v
    q, k, v = out.view(1, 3, 4, 24).chunk(3, dim=-1)
    for rows, part in zip(spec.slices, (q, k, v)):
        assert torch.equal(out[..., slice_rows(rows)], part.reshape(1, 3, 32))


def test_neox_update_on_q_changes_only_the_query_rows():
    base, model, specs = _adapted("gpt_neox")
    layer = model.get_submodule(specs[0].name)
    with torch.no_grad():
        layer.lora_b.normal_()
        layer.lora_b[1] = 0  # v slice: no update
    hidden = torch.randn(2, 5, 32)
    changed = (layer(hidden) - layer.base(hidden)).abs().sum(dim=(0, 1)) > 0
    assert torch.equal(torch.nonzero(changed).flatten(), slice_rows(specs[0].slices[0]))


def test_unknown_family_works_with_explicit_names_and_auto_says_how():
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(n_layer=1, n_embd=32, n_head=4, rotary_dim=4, vocab_size=97, n_positions=64))
    assert family_of(model.config, required=False) is None
    specs = find_targets(model, ["q_proj", "v_proj"], [])
    assert sorted(s.name for s in specs) == ["transformer.h.0.attn.q_proj", "transformer.h.0.attn.v_proj"]
    with pytest.raises(ConfigError, match=r"model_type 'gptj'.*dsee.target_modules=\[q_proj,v_proj\]"):
        find_targets(model, "auto", "auto")
