"""Structured pruning: the right heads and neurons go, the smaller model computes what the zeroed one does."""

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
from dsee_dist.models.pruned_gpt2 import load_pruned_model
from dsee_dist.pruning.structured import prune_structured, slice_adapter
from tests.unit.pruning.helpers import SINGLE, stage1_outputs

HEAD_DIM = 8  # tiny_gpt2: n_embd 32, 4 heads


def _prune(tmp_path, targets=("c_attn",), **kwargs):
    base_dir, adapter_dir, base, adapted = stage1_outputs(tmp_path, targets=targets)
    cfg = PruneConfig(method="structured", **kwargs)
    adapter = read_adapter(adapter_dir)
    report = prune_structured(cfg, str(base_dir), adapter, tmp_path / "pruned", SINGLE, log=lambda m: None)
    return base, adapted, adapter, report


def _zeroed(adapted, removed_heads, removed_neurons):
    """The unpruned (merged) model with the removed heads' value rows and the removed neurons' output rows zero:
    a head whose values are zero contributes nothing; a neuron whose c_proj row is zero neither."""
    for layer in dsee_layers(adapted).values():
        layer.merge()
    for i, block in enumerate(adapted.transformer.h):
        c_attn = block.attn.c_attn.base if isinstance(block.attn.c_attn, DSEELayer) else block.attn.c_attn
        proj = block.mlp.c_proj.base if isinstance(block.mlp.c_proj, DSEELayer) else block.mlp.c_proj
        with torch.no_grad():
            for h in removed_heads[i]:
                rows = slice(64 + h * HEAD_DIM, 64 + (h + 1) * HEAD_DIM)
                weight_out_in(c_attn)[rows] = 0
                c_attn.bias[rows] = 0
            for n in removed_neurons[i]:
                weight_out_in(proj)[:, n] = 0
    return adapted


@pytest.mark.parametrize("targets", [("c_attn",), ("c_attn", "c_fc", "mlp.c_proj")])
def test_pruned_model_equals_the_unpruned_one_with_those_heads_and_neurons_zeroed(tmp_path, targets):
    base, adapted, adapter, report = _prune(tmp_path, targets=targets, heads_removed=1, mlp_ratio=0.25)
    plan = report["plan"]
    assert [len(h) for h in plan["heads_kept"]] == [3, 3] and [len(n) for n in plan["neurons_kept"]] == [96, 96]
    pruned = load_pruned_model(tmp_path / "pruned").eval()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    # the pruned base + the stage-1 adapter sliced to the kept heads and neurons
    sliced_config, sliced_tensors = slice_adapter(adapter, plan, base.config)
    sliced_dir = tmp_path / "sliced"
    sliced_dir.mkdir()
    (sliced_dir / ADAPTER_CONFIG).write_text(json.dumps(sliced_config))
    save_file(sliced_tensors, str(sliced_dir / ADAPTER_WEIGHTS))
    apply_adapter(pruned, sliced_dir)
    x = torch.randint(0, 97, (2, 10))
    expected = _zeroed(adapted, plan["heads_removed"], plan["neurons_removed"])(x).logits
    torch.testing.assert_close(pruned(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_removed_heads_and_neurons_are_the_lowest_scoring(tmp_path):
    base, adapted, _, report = _prune(tmp_path, heads_removed=2, mlp_ratio=0.5)
    plan = report["plan"]
    for i in range(2):
        delta = dsee_layers(adapted)[f"transformer.h.{i}.attn.c_attn"].delta_weight().detach()
        per_head = (delta[:32].abs().sum(1) + delta[64:].abs().sum(1)).view(4, HEAD_DIM).sum(1)
        assert sorted(plan["heads_removed"][i]) == sorted(per_head.argsort()[:2].tolist())
        fc = weight_out_in(base.transformer.h[i].mlp.c_fc).detach()
        proj = weight_out_in(base.transformer.h[i].mlp.c_proj).detach()
        per_neuron = fc.abs().sum(1) + proj.abs().sum(0)  # MLP not adapted: |W0|
        assert sorted(plan["neurons_removed"][i]) == sorted(per_neuron.argsort()[:64].tolist())


def test_activation_scores_remove_what_writes_least_into_the_residual(tmp_path):
    base_dir, _, base, adapted = stage1_outputs(tmp_path, targets=("c_attn", "mlp.c_proj"))
    g = torch.Generator().manual_seed(5)
    norms = {}
    for i in range(2):
        norms[f"transformer.h.{i}.attn.c_proj"] = torch.rand(32, generator=g) + 0.5
        norms[f"transformer.h.{i}.mlp.c_proj"] = torch.rand(128, generator=g) + 0.5
    silent = [3, 17, 40, 41, 77, 90, 101, 127]  # neurons of layer 0 whose inputs are zero: they write nothing
    norms["transformer.h.0.mlp.c_proj"][silent] = 0.0
    norms["transformer.h.0.attn.c_proj"][2 * HEAD_DIM : 3 * HEAD_DIM] = 0.0  # head 2 of layer 0 likewise
    cfg = PruneConfig(method="structured", heads_removed=1, mlp_ratio=1 / 16, head_score="activation")
    plan = prune_structured(
        cfg, str(base_dir), read_adapter(tmp_path / "adapter"), tmp_path / "pruned", SINGLE, lambda m: None, norms
    )["plan"]
    assert plan["heads_removed"][0] == [2] and plan["neurons_removed"][0] == silent
    attn_out = weight_out_in(base.transformer.h[1].attn.c_proj).detach()  # not adapted: W0
    per_head = (attn_out.abs().sum(0) * norms["transformer.h.1.attn.c_proj"]).view(4, HEAD_DIM).sum(1)
    assert plan["heads_removed"][1] == per_head.argsort()[:1].tolist()
    mlp_out = dsee_layers(adapted)["transformer.h.1.mlp.c_proj"]  # adapted: W0 + dW
    merged = (weight_out_in(mlp_out.base) + mlp_out.delta_weight()).detach()
    per_neuron = merged.abs().sum(0) * norms["transformer.h.1.mlp.c_proj"]
    assert plan["neurons_removed"][1] == sorted(per_neuron.argsort()[:8].tolist())
    with pytest.raises(ValueError, match="needs the calibration norms"):
        prune_structured(cfg, str(base_dir), read_adapter(tmp_path / "adapter"), tmp_path / "p2", SINGLE)


def test_remote_code_config_and_plain_gpt2_for_mlp_only(tmp_path):
    _prune(tmp_path, mlp_ratio=0.25)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # uniform width: plain transformers
    assert type(plain).__name__ == "GPT2LMHeadModel" and plain.config.n_inner == 96
    (tmp_path / "h").mkdir()
    _prune(tmp_path / "h", heads_removed=1)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "h" / "pruned", trust_remote_code=True)
    assert remote.config.heads_per_layer == [3, 3]
    assert remote.transformer.h[0].attn.c_attn.weight.shape == (32, 3 * 3 * HEAD_DIM)


def test_more_heads_than_exist_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="removing 4 heads per layer leaves none of the model's 4"):
        _prune(tmp_path, heads_removed=4)
