"""methods.py: PEFT LoRA, Supra (Supertuning with r), SHiRA and full fine-tuning prepared for the shared trainer,
and their exports."""

import pytest
import torch
from safetensors.torch import load_file

from dsee_dist.config.schema import Config, DSEEConfig, PruneConfig
from dsee_dist.errors import ConfigError
from dsee_dist.recipes import methods
from tests.conftest import tiny_gpt2, tiny_llama


def _dsee_cfg(**kw) -> DSEEConfig:
    return DSEEConfig(lora_rank=4, lora_alpha=8.0, target_modules=kw.pop("targets", ["q_proj", "v_proj"]), **kw)


def _batch(vocab: int = 97, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (4, 16), generator=g)


def _train(model, params, steps: int = 15, lr: float = 1e-2) -> list[float]:
    ids = _batch()
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_trainable_count_equals_peft_own_count():
    model, trainable = methods.prepare_lora(tiny_llama(), _dsee_cfg(), seed=0)
    peft_trainable, _ = model.get_nb_trainable_parameters()
    # 2 layers x (q, v) x r * (in + out) with hidden 32
    assert sum(p.numel() for p in trainable) == peft_trainable == 2 * 2 * 4 * (32 + 32)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert {type(m).__module__.split(".")[0] for n, m in model.named_modules() if n.endswith("q_proj")} == {"peft"}


def test_lora_on_gpt2_uses_fan_in_fan_out_and_matches_plain_model_at_init():
    base = tiny_gpt2()
    ids = _batch()
    expected = base(input_ids=ids).logits
    model, trainable = methods.prepare_lora(base, _dsee_cfg(targets=["c_attn"]), seed=0)
    assert model.peft_config["default"].fan_in_fan_out
    torch.testing.assert_close(model(input_ids=ids).logits, expected)  # B = 0: exactly the base at step 0


@pytest.mark.parametrize("method", ["lora", "supra", "shira", "full"])
def test_training_lowers_the_loss(method):
    cfg = Config(method=method, dsee=_dsee_cfg())
    model, params = methods.prepare_trainable(cfg, tiny_llama())
    losses = _train(model, params)
    assert losses[-1] < losses[0] - 0.1  # a random 2-layer model on one batch: a clear drop, either way
    if method == "full":
        assert len(params) == len(list(model.parameters())) and all(p.requires_grad for p in params)


def test_lora_seed_gives_the_same_adapter_init():
    a, _ = methods.prepare_lora(tiny_llama(), _dsee_cfg(), seed=3)
    b, _ = methods.prepare_lora(tiny_llama(), _dsee_cfg(), seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa, pb, msg=na)


# per method: (tensor kinds written per adapted matrix, the key part of a tensor that starts at zero)
SAVED = {
    "lora": ({"lora_A", "lora_B"}, "lora_B"),
    "supra": ({"supertuning_values", "supertuning_lora_A", "supertuning_lora_B", "supertuning_indices"}, "values"),
    "shira": ({"shira_weight", "shira_indices"}, "shira_weight"),
}


@pytest.mark.parametrize("method", methods.PEFT_METHODS)
def test_saved_peft_adapter_reloads_with_peft_and_merges(tmp_path, method):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    cfg = Config(method=method, dsee=_dsee_cfg())
    model, params = methods.prepare_trainable(cfg, AutoModelForCausalLM.from_pretrained(base_dir))
    _train(model, params, steps=5)
    model.eval()
    ids = _batch(seed=2)
    expected = model(input_ids=ids).logits
    target = methods.save_trained(
        method, model, tmp_path / "run", base_model=str(base_dir), dsee_cfg=_dsee_cfg(), is_rank_zero=True
    )
    assert methods.is_peft_adapter(target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    kinds, starts_at_zero = SAVED[method]
    assert {k for k in kinds if any(f".{k}" in key for key in tensors)} == kinds
    assert len(tensors) == 2 * 2 * len(kinds) and all(t.numel() > 0 for t in tensors.values())
    assert all(float(t.abs().sum()) > 0 for k, t in tensors.items() if starts_at_zero in k)  # trained
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(target)).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    merged = methods.merge_peft_adapter(target, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_saved_full_model_reloads_as_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    tiny_gpt2().save_pretrained(base_dir)  # tied embeddings: lm_head shares wte
    model, params = methods.prepare_full(AutoModelForCausalLM.from_pretrained(base_dir))
    _train(model, params, steps=5)
    model.eval()
    ids = _batch(seed=2)
    expected = model(input_ids=ids).logits
    target = methods.save_trained(
        "full", model, tmp_path / "run", base_model=str(base_dir), dsee_cfg=_dsee_cfg(), is_rank_zero=True
    )
    assert target.name == "merged"
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_two_stage_pruning_with_lora_is_refused():
    cfg = Config(method="lora", dsee=_dsee_cfg(), prune=PruneConfig(method="unstructured"))
    with pytest.raises(ConfigError, match="needs method=dsee"):
        methods.prepare_trainable(cfg, tiny_llama())


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", methods.PEFT_METHODS)
def test_peft_method_equals_the_base_model_at_step_0_and_trains_only_its_adapters(method):
    base = tiny_llama()
    ids = _batch()
    expected = base(input_ids=ids).logits
    model, params = methods.prepare_trainable(Config(method=method, dsee=_dsee_cfg()), base)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)  # a zero update at step 0
    prefix = model.base_model.prefix
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if any(p is q for q in params)} == trained
    assert trained and all(prefix in n and (".q_proj." in n or ".v_proj." in n) for n in trained)
    before = _weights(model)
    _train(model, params, steps=3)
    after = _weights(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trained  # every frozen weight is bit for bit the pretrained one


def test_supra_budget_is_lora_plus_dsee_sparse_total_on_the_largest_weights():
    cfg = _dsee_cfg(num_sparse=16)
    base = tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))}
    model, params = methods.prepare_supra(base, cfg, seed=0)
    lora = 2 * 2 * 4 * (32 + 32)
    assert sum(p.numel() for p in params) == lora + 2 * 2 * 16  # LoRA's count + DSEE's 4 matrices x 16
    adapted = [(n, m) for n, m in model.named_modules() if hasattr(m, "supertuning_indices")]
    assert len(adapted) == 4
    for name, module in adapted:
        short = name.removeprefix("base_model.model.")
        support = module.supertuning_indices["default"].long()
        top = torch.topk(weights[short].abs().flatten(), 16).indices
        assert set(support.tolist()) == set(top.tolist()), name  # Supra's own choice: the largest |W0|


def test_supra_budget_matches_dsee_total_on_smollm2_shapes_and_nearest_elsewhere():
    smollm2 = [576 * 576, 192 * 576] * 30  # q_proj, v_proj of SmolLM2-135M's 30 layers; DSEE: 384 each
    budget = methods.supra_budget(smollm2, 384 * 60)
    assert budget["total"] == 384 * 60 and budget["counts"][:2] == [576, 192]  # split by size, total exact
    assert methods.supertuning_counts(smollm2, budget["sparsity"]) == budget["counts"]  # PEFT's own formula
    uneven = methods.supra_budget([1024, 512] * 2, 64)  # 21 + 10 or 22 + 11 per layer: 62 is nearest to 64
    assert uneven["total"] == 62 and uneven["counts"] == [21, 10, 21, 10]
    with pytest.raises(ConfigError, match="method=supra needs between"):
        methods.supra_budget([1024], 0)


def test_shira_trainable_count_equals_lora_and_its_update_stays_on_its_mask():
    model, params = methods.prepare_shira(tiny_llama(), _dsee_cfg(), seed=0)
    assert sum(p.numel() for p in params) == 2 * 2 * 4 * (32 + 32)  # LoRA's r(in + out) per matrix
    _train(model, params, steps=3)
    adapted = [(n, m) for n, m in model.named_modules() if hasattr(m, "shira_indices")]
    assert len(adapted) == 4
    for name, module in adapted:
        delta = module.get_delta_weight("default").to_dense()
        mask = torch.zeros_like(delta, dtype=torch.bool)
        mask[tuple(module.shira_indices["default"].long())] = True
        assert mask.sum() == 4 * (32 + 32) and delta[~mask].abs().sum() == 0, name
        assert delta[mask].abs().sum() > 0, name


@pytest.mark.parametrize("method", ["supra", "shira"])
def test_sparse_peft_methods_refuse_gpt2_conv1d_in_one_line(method):
    with pytest.raises(ConfigError, match=f"method={method} uses PEFT layers that adapt torch.nn.Linear only"):
        methods.prepare_trainable(Config(method=method, dsee=_dsee_cfg(targets=["c_attn"])), tiny_gpt2())
