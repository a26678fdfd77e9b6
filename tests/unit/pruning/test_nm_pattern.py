"""`prune.pattern: N:M`: every group of M consecutive input weights of every row of every pruned matrix keeps
exactly the N highest-scoring; stage 2's masks keep the pattern through re-tuning, and so does the merged
export; matrices whose width M does not divide are left dense and named; malformed patterns are refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsee_dist.config import PRUNE_MODULE_KINDS, PruneConfig, config_from_dict
from dsee_dist.config.loading import load_config
from dsee_dist.dsee.adapter import apply_adapter, read_adapter
from dsee_dist.dsee.inject import dsee_layers
from dsee_dist.dsee.layer import weight_out_in
from dsee_dist.errors import ConfigError
from dsee_dist.pruning.stage2 import attach_keep_masks
from dsee_dist.pruning.targets import prunable_matrices
from dsee_dist.pruning.unstructured import lowest_per_group_of_m, prune_unstructured
from dsee_dist.recipes.export import merge_into_base
from tests.conftest import REPO
from tests.unit.pruning.helpers import SINGLE, stage1_outputs


def _prune(tmp_path, pattern, score="delta"):
    base_dir, adapter_dir, base, adapted = stage1_outputs(tmp_path)
    norms = None
    if score == "activation":
        g = torch.Generator().manual_seed(5)
        widths = {m.module: m.in_features for m in prunable_matrices(base.config, list(PRUNE_MODULE_KINDS))}
        norms = {module: torch.rand(width, generator=g) + 0.1 for module, width in widths.items()}
    logged = []
    report = prune_unstructured(
        PruneConfig(method="unstructured", score=score, pattern=pattern),
        str(base_dir),
        read_adapter(adapter_dir),
        tmp_path / "pruned",
        SINGLE,
        seed=0,
        log=logged.append,
        input_norms=norms,
    )
    return base, adapted, report, norms, logged


def _groups(w: torch.Tensor, m: int) -> torch.Tensor:
    """(rows, groups, m) view of an (out x in) matrix."""
    return w.reshape(w.shape[0], -1, m)


@pytest.mark.parametrize(("pattern", "score"), [("2:4", "delta"), ("4:8", "activation"), ("1:4", "merged")])
def test_every_group_of_m_inputs_keeps_its_n_highest_scores(tmp_path, pattern, score):
    n, m = map(int, pattern.split(":"))
    base, adapted, report, norms, _ = _prune(tmp_path, pattern, score)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    matrices = prunable_matrices(base.config, list(PRUNE_MODULE_KINDS))
    assert report["pattern"] == pattern and report["dense_matrices"] == []
    for mat in matrices:
        rows = slice(mat.rows[0], mat.rows[0] + mat.rows[1])
        w0 = weight_out_in(base.get_submodule(mat.module))[rows].detach()
        kept = weight_out_in(pruned.get_submodule(mat.module))[rows].detach() != 0
        assert (_groups(kept, m).sum(dim=2) == n).all(), mat.name  # exactly N of every M (W0 has no zeros)
        adapted_matrix = mat.kind in ("attn_q", "attn_v")
        delta = dsee_layers(adapted)[mat.module].delta_weight()[rows].detach() if adapted_matrix else None
        if score == "delta":
            scores = (delta if delta is not None else w0).abs()
        else:
            scores = (w0 + (delta if delta is not None else 0)).abs()
            scores = scores * norms[mat.module][None, :] if score == "activation" else scores
        s, k = _groups(scores, m), _groups(kept, m)
        lowest_kept = torch.where(k, s, torch.inf).amin(dim=2)
        highest_pruned = torch.where(~k, s, -torch.inf).amax(dim=2)
        assert (highest_pruned <= lowest_kept).all(), mat.name
        assert report["matrices"][mat.name]["pruned"] == mat.numel * (m - n) // m


def test_stage2_masks_and_the_merged_export_keep_the_pattern(tmp_path):
    _prune(tmp_path, "2:4")
    stage2 = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    apply_adapter(stage2, tmp_path / "adapter")
    assert attach_keep_masks(stage2, tmp_path / "pruned", None)[0] == 2
    torch.manual_seed(7)
    with torch.no_grad():  # re-tuning moves every adapter parameter, also those on pruned entries
        for layer in dsee_layers(stage2).values():
            for param in layer.adapter_params().values():
                param.add_(torch.randn_like(param))
    merge_into_base(stage2)
    stage2.save_pretrained(tmp_path / "final")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for mat in prunable_matrices(exported.config, list(PRUNE_MODULE_KINDS)):
        w = weight_out_in(exported.get_submodule(mat.module))[mat.rows[0] : mat.rows[0] + mat.rows[1]].detach()
        assert ((_groups(w, 4) != 0).sum(dim=2) <= 2).all(), mat.name  # every group of every exported matrix
    adapted_q = weight_out_in(exported.get_submodule("transformer.h.0.attn.c_attn"))[:32].detach()
    assert ((_groups(adapted_q, 4) != 0).sum(dim=2) == 2).all()  # the update filled the kept entries


def test_matrices_whose_width_m_does_not_divide_stay_dense_and_are_named(tmp_path):
    base, _, report, _, logged = _prune(tmp_path, "32:64")  # widths: attention and c_fc 32, mlp c_proj 128
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    dense = [m for m in prunable_matrices(base.config, list(PRUNE_MODULE_KINDS)) if m.in_features % 64]
    assert report["dense_matrices"] == [m.name for m in dense] and len(dense) > 0
    lines = [line for line in logged if "left dense" in line]
    assert len(lines) == 1 and all(m.name in lines[0] for m in dense)
    for m in prunable_matrices(base.config, list(PRUNE_MODULE_KINDS)):
        w = weight_out_in(pruned.get_submodule(m.module))[m.rows[0] : m.rows[0] + m.rows[1]].detach()
        assert bool((w != 0).all()) == (m in dense), m.name
        assert report["matrices"][m.name]["pruned"] == (0 if m in dense else m.numel // 2)


def test_ties_are_broken_by_column_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 3.0]])
    assert lowest_per_group_of_m(scores, 2, 4).tolist() == [[True, True, False, False, True, False, True, False]]


@pytest.mark.parametrize("pattern", ["2-4", "4:4", "0:4", "5:4", "a:b", "2:4:8", ""])
def test_malformed_patterns_are_one_clear_error(pattern):
    data = {
        "model": {"builtin": "gpt2-tiny"},
        "train": {"max_steps": 1},
        "prune": {"method": "unstructured", "pattern": pattern, "retrain_steps": 1},
    }
    with pytest.raises(ConfigError, match=r"prune.pattern must be 'N:M' with whole numbers 1 <= N < M"):
        config_from_dict(data)


def test_an_unquoted_pattern_in_yaml_and_on_the_command_line_is_the_string(tmp_path):
    (tmp_path / "x.yaml").write_text(
        f"extends: {REPO / 'configs' / 'quickstart.yaml'}\n"
        "prune: {method: unstructured, pattern: 2:4, retrain_steps: 1}\n"
    )
    assert load_config(tmp_path / "x.yaml").prune.nm_pattern == (2, 4)  # not YAML 1.1's base-60 124
    cfg = load_config(tmp_path / "x.yaml", ["prune.pattern=4:8"])
    assert cfg.prune.pattern == "4:8" and cfg.prune.nm_pattern == (4, 8)
    with pytest.raises(ConfigError, match="prune.pattern applies to prune.method=unstructured"):
        load_config(tmp_path / "x.yaml", ["prune.method=structured", "prune.mlp_ratio=0.25"])
