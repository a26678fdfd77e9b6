"""Both prunings on every decoder family: the export reloads with stock transformers and computes what the
masked model does (unstructured: the stage-2 model with its masks; structured: the unpruned model with the
removed heads' output columns and the removed neurons' down-projection columns zeroed)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from dsee_dist.config import PruneConfig
from dsee_dist.dsee.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapter, read_adapter
from dsee_dist.dsee.inject import dsee_layers
from dsee_dist.dsee.layer import DSEELayer, weight_out_in
from dsee_dist.errors import ConfigError
from dsee_dist.models.shape import model_shape
from dsee_dist.pruning.stage2 import attach_keep_masks
from dsee_dist.pruning.structured import prune_structured, slice_adapter
from dsee_dist.pruning.targets import KINDS, module_name, prunable_matrices
from dsee_dist.pruning.unstructured import prune_unstructured
from dsee_dist.recipes.export import merge_into_base
from tests.unit.models.family_models import FAMILY_MODELS, HEAD_PRUNABLE, SINGLE, batch, stage1

ALL_TARGETS = {  # q and v plus the MLP, so slicing of adapted MLP matrices is exercised too
    "gpt2": ["c_attn", "c_fc", "mlp.c_proj"],
    "opt": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"],
}
LLAMA_TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _targets(kind):
    return ALL_TARGETS.get(kind, LLAMA_TARGETS)


def _reload(model, tmp_path, name):
    merge_into_base(model)
    model.save_pretrained(tmp_path / name)
    return AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()


@pytest.mark.parametrize("kind", FAMILY_MODELS)
def test_unstructured_export_is_sparse_and_reloads_with_the_masked_logits(tmp_path, kind):
    base_dir, adapter_dir, base, _ = stage1(tmp_path, kind, targets=_targets(kind), fused=["q", "v"])
    cfg = PruneConfig(method="unstructured", ratio=0.3, group_ratios={"adapted": 0.5})
    report = prune_unstructured(
        cfg, str(base_dir), read_adapter(adapter_dir), tmp_path / "pruned", SINGLE, seed=0, log=lambda m: None
    )
    matrices = prunable_matrices(base.config, list(KINDS))
    assert set(report["matrices"]) == {m.name for m in matrices}
    for group, ratio in (("adapted", 0.5), ("frozen", 0.3)):
        stats = report["groups"][group]
        assert stats["pruned"] == round(ratio * stats["numel"])
    stage2 = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    apply_adapter(stage2, adapter_dir)
    attached, _ = attach_keep_masks(stage2, tmp_path / "pruned", None)
    assert attached == len(dsee_layers(stage2))
    x = batch()
    with torch.no_grad():
        masked = stage2(x).logits
    exported = _reload(stage2, tmp_path, "merged")
    torch.testing.assert_close(exported(x).logits, masked, atol=1e-5, rtol=1e-5)
    zeros = sum(int((m.rows_of(weight_out_in(exported.get_submodule(m.module))) == 0).sum()) for m in matrices)
    assert zeros >= report["total"]["pruned"]  # truly sparse: every pruned entry is zero in the merged weights


def _masked_unpruned(adapted, plan, shape):
    """The merged stage-1 model with removed heads' output columns and removed neurons' down columns zero."""
    for layer in dsee_layers(adapted).values():
        layer.merge()
    family, hd = shape.family, shape.head_dim
    for i in range(shape.n_layer):
        o = adapted.get_submodule(module_name(shape, i, family.o))
        down = adapted.get_submodule(module_name(shape, i, family.mlp_out))
        o, down = (m.base if isinstance(m, DSEELayer) else m for m in (o, down))
        with torch.no_grad():
            for h in plan["heads_removed"][i]:
                weight_out_in(o)[:, h * hd : (h + 1) * hd] = 0
            for n in plan["neurons_removed"][i]:
                weight_out_in(down)[:, n] = 0
    return adapted


@pytest.mark.parametrize("kind", FAMILY_MODELS)
def test_structured_export_is_a_stock_model_with_the_masked_logits(tmp_path, kind):
    base_dir, adapter_dir, base, adapted = stage1(tmp_path, kind, targets=_targets(kind), fused=["q", "v"])
    heads = kind in HEAD_PRUNABLE
    cfg = PruneConfig(method="structured", head_ratio=0.34 if heads else 0.0, mlp_ratio=0.25)
    adapter = read_adapter(adapter_dir)
    report = prune_structured(cfg, str(base_dir), adapter, tmp_path / "pruned", SINGLE, log=lambda m: None)
    shape = model_shape(base.config)
    plan = report["plan"]
    assert report["inner_per_layer"] == [shape.inner[0] * 3 // 4] * 2
    if heads:
        assert all(0 < len(h) < shape.heads[0] for h in plan["heads_kept"])
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=kind == "gpt2").eval()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    if kind != "gpt2":  # a stock class and config of the family (GPT-2 cannot express fewer heads)
        assert type(pruned) is type(base) and "auto_map" not in json.loads(
            (tmp_path / "pruned" / "config.json").read_text()
        )
    sliced_config, sliced_tensors = slice_adapter(adapter, plan, base.config)
    sliced_dir = tmp_path / "sliced"
    sliced_dir.mkdir()
    (sliced_dir / ADAPTER_CONFIG).write_text(json.dumps(sliced_config))
    save_file(sliced_tensors, str(sliced_dir / ADAPTER_WEIGHTS))
    apply_adapter(pruned, sliced_dir)
    x = batch()
    with torch.no_grad():
        expected = _masked_unpruned(adapted, plan, shape)(x).logits
        torch.testing.assert_close(pruned(x).logits, expected, atol=1e-5, rtol=1e-5)
    if kind != "gpt2":
        exported = _reload(pruned, tmp_path, "merged")
        assert type(exported) is type(base)
        torch.testing.assert_close(exported(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_gqa_removes_query_heads_evenly_from_every_kv_group_and_keeps_kv(tmp_path):
    base_dir, adapter_dir, base, _ = stage1(tmp_path, "llama_gqa")
    cfg = PruneConfig(method="structured", head_ratio=0.25, mlp_ratio=0.25)  # 9 heads, 3 groups of 3
    report = prune_structured(
        cfg, str(base_dir), read_adapter(adapter_dir), tmp_path / "pruned", SINGLE, log=lambda m: None
    )
    for removed in report["plan"]["heads_removed"]:
        assert sorted(h // 3 for h in removed) == [0, 1, 2]  # one from each group
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
        config["intermediate_size"],
    ) == (6, 3, 8, 72)


def test_gqa_heads_removed_must_be_a_multiple_of_the_kv_heads(tmp_path):
    base_dir, adapter_dir, _, _ = stage1(tmp_path, "llama_gqa")
    with pytest.raises(ConfigError, match="use a multiple of 3"):
        prune_structured(
            PruneConfig(method="structured", heads_removed=2),
            str(base_dir),
            read_adapter(adapter_dir),
            tmp_path / "pruned",
            SINGLE,
            log=lambda m: None,
        )


@pytest.mark.parametrize("kind", ["opt", "gpt_neox"])
def test_head_pruning_is_refused_where_the_config_cannot_express_it(tmp_path, kind):
    base_dir, adapter_dir, _, _ = stage1(tmp_path, kind)
    with pytest.raises(ConfigError, match="prune MLP neurons only"):
        prune_structured(
            PruneConfig(method="structured", heads_removed=1),
            str(base_dir),
            read_adapter(adapter_dir),
            tmp_path / "pruned",
            SINGLE,
            log=lambda m: None,
        )


def test_non_uniform_layers_are_refused_for_llama(tmp_path):
    base_dir, adapter_dir, _, _ = stage1(tmp_path, "llama")
    cfg = PruneConfig(method="structured", mlp_ratio=0.25)
    cfg.uniform_per_layer = False
    with pytest.raises(ConfigError, match="set prune.uniform_per_layer=true"):
        prune_structured(cfg, str(base_dir), read_adapter(adapter_dir), tmp_path / "pruned", SINGLE, log=lambda m: None)


def test_a_head_count_llama_config_refuses_is_a_clear_error():
    from transformers import LlamaConfig

    from dsee_dist.pruning.structured import check_structured_request

    # transformers' LlamaConfig wants hidden_size divisible by num_attention_heads, also with head_dim set
    config = LlamaConfig(
        hidden_size=40, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=97
    )
    with pytest.raises(ConfigError, match=r"3 heads.*not a valid LlamaConfig.*divide hidden_size \(40\)"):
        check_structured_request(PruneConfig(method="structured", heads_removed=1), config)
    check_structured_request(PruneConfig(method="structured", heads_removed=2), config)  # 2 heads of 10: fine
