"""methods.py: PEFT LoRA and full fine-tuning prepared for the shared trainer, and their exports."""

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


@pytest.mark.parametrize("method", ["lora", "full"])
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


def test_saved_lora_adapter_reloads_with_peft_and_merges(tmp_path):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model, params = methods.prepare_lora(AutoModelForCausalLM.from_pretrained(base_dir), _dsee_cfg(), seed=0)
    _train(model, params, steps=5)
    model.eval()
    ids = _batch(seed=2)
    expected = model(input_ids=ids).logits
    target = methods.save_trained(
        "lora", model, tmp_path / "run", base_model=str(base_dir), dsee_cfg=_dsee_cfg(), is_rank_zero=True
    )
    assert methods.is_peft_adapter(target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 2 and all(t.numel() > 0 for t in tensors.values())
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if "lora_B" in k)  # trained, not the zero init
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
