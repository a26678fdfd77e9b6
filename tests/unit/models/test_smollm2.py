"""The real SmolLM2-135M-Instruct (fetched once per machine by `dsee-dist models fetch smollm2` into the
user cache): `auto` targets, 20 DSEE steps lower the eval loss, and 25 % heads + 25 % neurons of structured
pruning export a stock LlamaForCausalLM with the masked model's logits."""

import copy
import csv
import json

import pytest
import torch
from safetensors.torch import save_file

from dsee_dist.config import DSEEConfig, PruneConfig
from dsee_dist.dsee.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapter, read_adapter, save_adapter
from dsee_dist.dsee.inject import find_targets, inject_dsee, mark_only_adapters_trainable
from dsee_dist.models.flops import compare, flops_per_token
from dsee_dist.models.shape import model_shape
from dsee_dist.pruning.structured import prune_structured, slice_adapter
from dsee_dist.recipes.export import merge_into_base
from tests.conftest import REPO
from tests.unit.models.family_models import SINGLE, magnitude_support
from tests.unit.pruning.test_families_pruning import _masked_unpruned


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        smollm2_dir
    )


E2E_SAMPLE = REPO / "dsee_dist" / "data" / "e2e_sample"


def _e2e_batch(tokenizer, first: int, count: int, length: int = 32) -> torch.Tensor:
    with open(E2E_SAMPLE / "train.csv", newline="") as f:  # the package's built-in sample: no ../shared needed
        rows = list(csv.DictReader(f))[first : first + count]
    texts = [f"{r['mr']} => {r['ref']}" for r in rows]
    ids = tokenizer(texts, max_length=length, truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    return ids


def test_auto_targets_and_twenty_steps_lower_the_eval_loss(smollm2):
    base, tokenizer = smollm2
    model = copy.deepcopy(base)
    specs = find_targets(model, "auto", "auto")
    assert len(specs) == 60 and specs[0].name == "model.layers.0.self_attn.q_proj"
    assert (specs[1].out_features, specs[1].in_features) == (192, 576)  # v_proj: 3 KV heads of 64
    inject_dsee(model, specs, magnitude_support(model, specs, 16), rank=8, alpha=16, dropout=0.0, seed=0)
    params = mark_only_adapters_trainable(model)
    train, held_out = _e2e_batch(tokenizer, 0, 4, length=16), _e2e_batch(tokenizer, 396, 4, length=16)
    labels = lambda ids: ids.masked_fill(ids == tokenizer.pad_token_id, -100)  # noqa: E731

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(held_out, labels=labels(held_out)).loss.item()

    before = eval_loss()
    with torch.no_grad():
        assert torch.equal(model(held_out).logits, base(held_out).logits)  # step 0: the base model exactly
    optimizer = torch.optim.AdamW(params, lr=3e-4)  # 20 small steps: learn the format, not the rows
    model.train()
    for _ in range(20):
        loss = model(train, labels=labels(train)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < before - 0.05, (before, after)


def test_structured_25_percent_exports_a_stock_llama_with_the_masked_logits(smollm2, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    base, tokenizer = smollm2
    adapted = copy.deepcopy(base)
    specs = find_targets(adapted, "auto", "auto")
    inject_dsee(adapted, specs, magnitude_support(adapted, specs, 16), rank=4, alpha=8, dropout=0.0, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(("lora_b", "sparse_values")):
                p.normal_(0, 0.02)
    save_adapter(
        adapted,
        tmp_path / "adapter",
        base_model=str(smollm2_dir),
        dsee_cfg=DSEEConfig(lora_rank=4, lora_alpha=8, num_sparse=16),
        is_rank_zero=True,
    )
    adapter = read_adapter(tmp_path / "adapter")
    cfg = PruneConfig(method="structured", head_ratio=0.25, mlp_ratio=0.25)
    report = prune_structured(cfg, str(smollm2_dir), adapter, tmp_path / "pruned", SINGLE, log=lambda m: None)
    assert report["heads_per_layer"] == [6] * 30 and report["kv_heads_per_layer"] == [3] * 30
    assert report["inner_per_layer"] == [1152] * 30

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(pruned) is LlamaForCausalLM
    assert (
        pruned.config.num_attention_heads,
        pruned.config.num_key_value_heads,
        pruned.config.head_dim,
        pruned.config.intermediate_size,
    ) == (6, 3, 64, 1152)
    saved = compare(flops_per_token(base.config), flops_per_token(pruned.config))["blocks_saved"]
    assert saved >= 0.25
    sliced_config, sliced_tensors = slice_adapter(adapter, report["plan"], base.config)
    (tmp_path / "sliced").mkdir()
    (tmp_path / "sliced" / ADAPTER_CONFIG).write_text(json.dumps(sliced_config))
    save_file(sliced_tensors, str(tmp_path / "sliced" / ADAPTER_WEIGHTS))
    apply_adapter(pruned, tmp_path / "sliced")
    merge_into_base(pruned)
    pruned.save_pretrained(tmp_path / "final")
    del pruned
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    x = _e2e_batch(tokenizer, 0, 2, length=16)
    with torch.no_grad():
        expected = _masked_unpruned(adapted, report["plan"], model_shape(base.config))(x).logits
        # 30 fp32 layers whose matmuls differ in shape (6 heads vs 9 with zeroed columns): |logits| ~ 20,
        # measured max difference 1.3e-4
        torch.testing.assert_close(exported(x).logits, expected, atol=5e-4, rtol=1e-4)
