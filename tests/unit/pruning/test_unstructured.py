"""Unstructured pruning of a stage-1 model on disk, and the masked update of stage 2."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dsee_dist.config import PRUNE_MODULE_KINDS, PruneConfig
from dsee_dist.dsee.adapter import apply_adapter, read_adapter
from dsee_dist.dsee.inject import dsee_layers, set_submodule
from dsee_dist.dsee.layer import weight_out_in
from dsee_dist.errors import ConfigError
from dsee_dist.pruning.stage2 import attach_keep_masks
from dsee_dist.pruning.targets import prunable_matrices
from dsee_dist.pruning.unstructured import prune_unstructured
from tests.unit.pruning.helpers import SINGLE, stage1_outputs


def _random_norms(model) -> dict[str, torch.Tensor]:
    """Positive per-module input norms, as calibration gives (one per module, its input width)."""
    g = torch.Generator().manual_seed(5)
    return {name: torch.rand(m.in_features, generator=g) + 0.1 for name, m in _first_matrices(model).items()}


def _first_matrices(model):
    out = {}
    for m in prunable_matrices(model.config, list(PRUNE_MODULE_KINDS)):
        out.setdefault(m.module, m)
    return out


def _prune(tmp_path, norms=False, **kwargs):
    base_dir, adapter_dir, base, adapted = stage1_outputs(tmp_path)
    cfg = PruneConfig(method="unstructured", **kwargs)
    input_norms = _random_norms(base) if norms else None
    report = prune_unstructured(
        cfg,
        str(base_dir),
        read_adapter(adapter_dir),
        tmp_path / "pruned",
        SINGLE,
        seed=0,
        log=lambda m: None,
        input_norms=input_norms,
    )
    return base, adapted, report, input_norms


@pytest.mark.parametrize("score", ["delta", "merged", "base", "activation", "random"])
def test_each_group_loses_exactly_its_ratio_and_the_lowest_scores(tmp_path, score):
    base, adapted, report, norms = _prune(
        tmp_path, norms=score == "activation", score=score, ratio=0.3, group_ratios={"adapted": 0.5}
    )
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    matrices = prunable_matrices(base.config, ["attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_out"])
    groups = {"adapted": [], "frozen": []}
    for m in matrices:
        rows = slice(m.rows[0], m.rows[0] + m.rows[1])
        w_before = weight_out_in(base.get_submodule(m.module))[rows].detach()
        w_after = weight_out_in(pruned.get_submodule(m.module))[rows].detach()
        removed = w_after == 0
        assert torch.equal(w_after[~removed], w_before[~removed])  # kept entries untouched
        adapted_matrix = m.kind in ("attn_q", "attn_v")
        delta = dsee_layers(adapted)[m.module].delta_weight()[rows].detach() if adapted_matrix else None
        score_of = {
            "delta": (delta if delta is not None else w_before).abs(),
            "base": w_before.abs(),
            "merged": (w_before + (delta if delta is not None else 0)).abs(),
            "activation": (w_before + (delta if delta is not None else 0)).abs() * norms[m.module][None, :]
            if norms
            else None,
        }.get(score)
        groups["adapted" if adapted_matrix else "frozen"].append((removed, score_of))
        assert report["matrices"][m.name]["pruned"] == int(removed.sum())
    for group, ratio in (("adapted", 0.5), ("frozen", 0.3)):
        removed = torch.cat([r.flatten() for r, _ in groups[group]])
        assert int(removed.sum()) == round(ratio * removed.numel())  # one global ranking per group
        if score != "random":
            values = torch.cat([s.flatten() for _, s in groups[group]])
            assert float(values[removed].max()) <= float(values[~removed].min())
    # global ranking, not per matrix: the share differs between the matrices of a group
    shares = {round(int(r.sum()) / r.numel(), 3) for r, _ in groups["frozen"]}
    assert len(shares) > 1


def test_masked_update_keeps_pruned_entries_of_the_effective_weight_zero(tmp_path):
    base, adapted, _, _ = _prune(tmp_path, ratio=0.4)
    pruned_base = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    stage2 = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    apply_adapter(stage2, tmp_path / "adapter")
    assert attach_keep_masks(stage2, tmp_path / "pruned", None) == (2, 0)
    x = torch.randint(0, 97, (2, 9))
    logits = stage2(x).logits
    # definition: every adapted weight is (W0 * M + ΔW) * M, where M is W0's zero pattern after pruning
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    for name in dsee_layers(stage2):
        w0 = weight_out_in(pruned_base.get_submodule(name)).detach()
        keep = torch.ones_like(w0, dtype=torch.bool)  # q rows 0-31 and v rows 64-95 are adapted
        keep[:32] = w0[:32] != 0
        keep[64:] = w0[64:] != 0
        effective = (w0 + dsee_layers(adapted)[name].delta_weight().detach()) * keep
        with torch.no_grad():
            weight_out_in(reference.get_submodule(name)).copy_(effective)
    torch.testing.assert_close(logits, reference(x).logits, atol=1e-6, rtol=1e-6)
    # gradients reach only kept entries: a pruned sparse value gets none
    logits.square().mean().backward()
    for name, layer in dsee_layers(stage2).items():
        keep = layer.prune_mask.mask.bool()
        rows, cols = layer.sparse_index
        which = (rows >= 64).long()
        kept_entries = keep[which, rows - 64 * which, cols]
        assert torch.all(layer.sparse_values.grad[~kept_entries] == 0)
        # merging gives the same weights: zero wherever pruned
        layer.merge()
        merged = weight_out_in(layer.base).detach()
        assert torch.all(merged[:32][~keep[0]] == 0) and torch.all(merged[64:][~keep[1]] == 0)
        set_submodule(stage2, name, layer.base)
    torch.testing.assert_close(stage2(x).logits, logits, atol=1e-5, rtol=1e-5)


def test_unknown_module_kind_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="prune.modules: 'attn_z' is not a prunable module kind"):
        _prune(tmp_path, modules=["attn_q", "attn_z"])


def test_masks_file_holds_the_kept_entries_of_adapted_rows(tmp_path):
    _prune(tmp_path, ratio=0.25)
    masks = load_file(str(tmp_path / "pruned" / "dsee_masks-00000.safetensors"))
    assert set(masks) == {"transformer.h.0.attn.c_attn.keep", "transformer.h.1.attn.c_attn.keep"}
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    w = weight_out_in(pruned.get_submodule("transformer.h.0.attn.c_attn")).detach()
    keep = masks["transformer.h.0.attn.c_attn.keep"]
    assert torch.equal(keep[0], w[:32] != 0) and torch.equal(keep[1], w[64:] != 0)


def test_row_grouping_prunes_each_output_row_by_activation_score(tmp_path):
    base, adapted, report, norms = _prune(
        tmp_path, norms=True, score="activation", grouping="row", ratio=0.25, group_ratios={"adapted": 0.5}
    )
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    for m in prunable_matrices(base.config, list(PRUNE_MODULE_KINDS)):
        rows = slice(m.rows[0], m.rows[0] + m.rows[1])
        w_before = weight_out_in(base.get_submodule(m.module))[rows].detach()
        removed = weight_out_in(pruned.get_submodule(m.module))[rows].detach() == 0
        adapted_matrix = m.kind in ("attn_q", "attn_v")
        merged = w_before + (dsee_layers(adapted)[m.module].delta_weight()[rows].detach() if adapted_matrix else 0)
        scores = merged.abs() * norms[m.module][None, :]
        k = round((0.5 if adapted_matrix else 0.25) * m.in_features)
        assert removed.sum(dim=1).tolist() == [k] * m.rows[1], m.name  # every row loses exactly its share
        for row in range(m.rows[1]):  # and the lowest scores of that row
            assert float(scores[row][removed[row]].max()) <= float(scores[row][~removed[row]].min())
    assert report["groups"]["adapted"]["pruned"] == sum(
        s["pruned"] for s in report["matrices"].values() if s["group"] == "adapted"
    )


def test_activation_score_without_norms_is_refused(tmp_path):
    with pytest.raises(ValueError, match="score 'activation' needs the input norms"):
        _prune(tmp_path, score="activation")
