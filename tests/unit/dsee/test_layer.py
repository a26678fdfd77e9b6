"""The DSEE layer against PEFT's LoRA and against its own definition."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from dsee_dist.dsee.inject import find_targets, inject_dsee, mark_only_adapters_trainable
from dsee_dist.dsee.layer import DSEELayer, weight_out_in
from tests.conftest import tiny_gpt2, tiny_llama


def _dsee_like_peft(model, peft_model, targets, fan_in_fan_out):
    """Our model with N = 0 and the same A, B values as PEFT's."""
    specs = find_targets(model, targets, fused_slices=[])
    inject_dsee(model, specs, {}, rank=4, alpha=8, dropout=0.0, seed=0)
    mark_only_adapters_trainable(model)
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            ours = model.get_submodule(name.replace("base_model.model.", "", 1))
            with torch.no_grad():
                ours.lora_a.copy_(module.lora_A["default"].weight)
                ours.lora_b[0].copy_(module.lora_B["default"].weight)
    return model


@pytest.mark.parametrize("family", ["gpt2_conv1d", "llama_linear"])
def test_num_sparse_zero_matches_peft_lora_outputs_and_gradients(family):
    if family == "gpt2_conv1d":
        base, targets, fan = tiny_gpt2(), ["c_attn"], True
    else:
        base, targets, fan = tiny_llama(), ["q_proj", "v_proj"], False
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=fan)
    )
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the update non-trivial
            with torch.no_grad():
                p.normal_(0, 0.1)
    ours = _dsee_like_peft(copy.deepcopy(base), peft_model, targets, fan)
    x = torch.randint(0, 97, (3, 11))
    out_peft = peft_model(input_ids=x).logits
    out_ours = ours(input_ids=x).logits
    torch.testing.assert_close(out_ours, out_peft, atol=1e-6, rtol=1e-6)
    out_peft.square().mean().backward()
    out_ours.square().mean().backward()
    n_compared = 0
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            mine = ours.get_submodule(name.replace("base_model.model.", "", 1))
            torch.testing.assert_close(mine.lora_a.grad, module.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(mine.lora_b.grad[0], module.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-5)
            n_compared += 1
    assert n_compared == 2 * len(targets)  # 2 layers x each target


def _adapted_gpt2(num_sparse=8, slices=("q", "v"), seed=0):
    model = tiny_gpt2(seed)
    base = copy.deepcopy(model)
    specs = find_targets(model, ["c_attn"], list(slices))
    g = torch.Generator().manual_seed(3)
    support = {}
    for spec in specs:
        for (_start, size), name in zip(spec.slices, spec.matrix_names()):
            flat = torch.randperm(size * spec.in_features, generator=g)[:num_sparse]
            support[name] = torch.stack([flat // spec.in_features, flat % spec.in_features])
    inject_dsee(model, specs, support, rank=4, alpha=8, dropout=0.0, seed=0)
    trainable = mark_only_adapters_trainable(model)
    return base, model, trainable


def test_step_zero_logits_equal_base_exactly():
    base, model, _ = _adapted_gpt2()
    x = torch.randint(0, 97, (2, 13))
    assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)


def test_gradients_reach_only_adapter_parameters():
    _, model, trainable = _adapted_gpt2()
    model(input_ids=torch.randint(0, 97, (2, 9))).logits.sum().backward()
    ids = {id(p) for p in trainable}
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"lora_a", "lora_b", "sparse_values"}
    for name, p in model.named_parameters():
        if id(p) not in ids:
            assert p.grad is None, name
        elif name.endswith("lora_a"):
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name  # exactly zero while B = 0
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_trained_update_outside_low_rank_lives_only_on_support():
    base, model, trainable = _adapted_gpt2()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(5):
        x = torch.randint(0, 97, (4, 12))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, layer in model.named_modules():
        if not isinstance(layer, DSEELayer):
            continue
        w0 = weight_out_in(base.get_submodule(name)).detach().clone()
        low_rank = torch.zeros_like(w0)
        for i, (start, size) in enumerate(layer.slices):
            low_rank[start : start + size] = layer.lora_b[i] @ layer.lora_a[i * layer.rank : (i + 1) * layer.rank]
        layer.merge()
        residual = weight_out_in(layer.base).detach() - w0 - layer.scaling * low_rank
        on_support = torch.zeros_like(residual, dtype=torch.bool)
        on_support[layer.sparse_index[0], layer.sparse_index[1]] = True
        assert residual[~on_support].abs().max() < 1e-6
        assert residual[on_support].abs().min() > 0  # every sparse value moved
        # the k slice (rows n_embd..2 n_embd) is not adapted at all
        d = layer.out_features // 3
        assert torch.equal(weight_out_in(layer.base)[d : 2 * d], w0[d : 2 * d])


def test_merge_and_unmerge_preserve_outputs():
    _, model, trainable = _adapted_gpt2()
    with torch.no_grad():
        for p in trainable:
            p.normal_(0, 0.05)
    x = torch.randint(0, 97, (2, 10))
    before = model(input_ids=x).logits
    layers = [m for m in model.modules() if isinstance(m, DSEELayer)]
    w_before = [m.base.weight.detach().clone() for m in layers]
    for m in layers:
        m.merge()
    torch.testing.assert_close(model(input_ids=x).logits, before, atol=1e-5, rtol=1e-5)
    for m, w in zip(layers, w_before):
        m.unmerge()
        torch.testing.assert_close(m.base.weight, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=x).logits, before, atol=1e-6, rtol=1e-6)


def test_sparse_update_equals_dense_masked_matrix():
    lin = torch.nn.Linear(16, 12)
    idx = torch.tensor([[0, 3, 3, 11], [5, 0, 15, 7]])
    layer = DSEELayer(lin, rank=2, alpha=4, sparse_index=idx)
    with torch.no_grad():
        layer.sparse_values.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        layer.lora_b.normal_()
    x = torch.randn(5, 16)
    dense_s = torch.zeros(12, 16)
    dense_s[idx[0], idx[1]] = layer.sparse_values.detach()
    expected = lin(x) + layer.scaling * (x @ layer.lora_a.T @ layer.lora_b[0].T + x @ dense_s.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.sparse_values.numel() == 4  # N values, not a dense out x in tensor


def test_dropout_applies_to_low_rank_path_only_in_training():
    lin = torch.nn.Linear(8, 8)
    layer = DSEELayer(lin, rank=2, alpha=2, dropout=0.5, sparse_index=torch.tensor([[1], [2]]))
    with torch.no_grad():
        layer.lora_b.fill_(1.0)
    x = torch.randn(4, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(a, layer(x))


def test_invalid_sparse_index_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        DSEELayer(torch.nn.Linear(4, 4), rank=1, alpha=1, sparse_index=torch.tensor([[4], [0]]))
