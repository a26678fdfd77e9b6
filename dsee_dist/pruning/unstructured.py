"""Unstructured pruning of the final weights: the lowest-scoring fraction of each group, ranked globally
over the group (METHOD.md §3), or of each output row (`grouping: row`, as Wanda), or N:M (`pattern: N:M`:
the N highest-scoring of every M consecutive input weights of every row kept, the pattern sparse tensor
cores run; a matrix whose input width M does not divide is left dense and named in the log), written as a
pruned copy of the base model.

Work is split by module: module i is scored and written by rank i % world_size, which reads only that
module's weight from the base files and keeps only the scores of the modules it owns. The threshold of
each group comes from `selection.lowest_k_masks` (all-reduced histograms), so no rank gathers other
ranks' weights, scores or masks. Output (`<target>`):

- the base model with pruned entries set to zero (the same architecture: loads with transformers);
- `dsee_masks-<rank>.safetensors`: for every adapted module, the kept entries of its adapted rows
  (n_slices x rows x in, bool), which stage 2 applies to the update so that (W0 + ΔW) * M holds during
  training exactly as in the export;
- `dsee_pruning.json`: method, score, per-matrix and per-group sparsity.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dsee_dist.dsee.adapter import layer_delta
from dsee_dist.dsee.layer import row_slots, slice_rows
from dsee_dist.engine import process_group
from dsee_dist.pruning.model_files import ModelFiles, write_pruned_model
from dsee_dist.pruning.scores import element_scores
from dsee_dist.pruning.selection import lowest_k_masks
from dsee_dist.pruning.targets import PrunableMatrix, file_to_out_in, out_in_to_file, prunable_matrices

logger = logging.getLogger(__name__)
REPORT_FILE = "dsee_pruning.json"
MASKS_PATTERN = "dsee_masks-{rank:05d}.safetensors"
MASKS_GLOB = "dsee_masks-*.safetensors"


def group_of(matrix: PrunableMatrix, adapted: bool, grouping: str) -> str:
    """The group a matrix is ranked in (`row` ranks within rows, and takes its ratio from the adaptation group)."""
    if grouping == "global":
        return "all"
    if grouping == "kind":
        return matrix.kind
    return "adapted" if adapted else "frozen"


def lowest_per_row(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """True on the round(ratio * in) lowest scores of every row (ties broken by column index)."""
    k = round(ratio * scores.shape[1])
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        pruned.scatter_(1, order, True)
    return pruned


def lowest_per_group_of_m(scores: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """N:M sparsity: True on the m - n_keep lowest scores of every group of m consecutive columns of every row
    (ties broken by column index), so each group keeps exactly n_keep. The width must be a multiple of m."""
    rows, width = scores.shape
    groups = scores.reshape(rows, width // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[..., : m - n_keep]
    pruned = torch.zeros_like(groups, dtype=torch.bool)
    pruned.scatter_(2, order, True)
    return pruned.reshape(rows, width)


def adapted_slice(adapter_config: dict, module: str, rows: tuple) -> int | None:
    """Index of the adapter slice of `module` that contains the row set `rows` ((start, size) or
    (start, size, block, stride)), or None if those rows are not adapted."""
    meta = adapter_config["layers"].get(module)
    if meta is None:
        return None
    wanted = set(slice_rows(tuple(rows)).tolist())
    for i, rows_spec in enumerate(meta["slices"]):
        if wanted <= set(slice_rows(tuple(rows_spec)).tolist()):
            return i
    return None


def adapted_rows(adapter_config: dict, matrix: PrunableMatrix) -> int | None:
    return adapted_slice(adapter_config, matrix.module, matrix.rows)


def slice_positions(adapter_config: dict, matrix: PrunableMatrix, slice_index: int) -> torch.Tensor:
    """Positions of the matrix's rows within adapter slice `slice_index` of its module."""
    meta = adapter_config["layers"][matrix.module]
    rows_spec = tuple(meta["slices"][slice_index])
    slots = row_slots([rows_spec], meta["out_features"])
    return slots[matrix.row_index()]


@dataclass(frozen=True)
class _Work:
    """The matrices to prune, the group each is ranked in, and how modules are split over ranks (module i is
    scored and written by rank i % world_size)."""

    matrices: list[PrunableMatrix]
    groups: dict[str, str]  # matrix name -> group
    modules: list[str]  # every module holding a pruned matrix, in model order
    mine: list[str]  # the modules this rank owns

    @classmethod
    def of(cls, prune_cfg, model_config, adapter_config: dict, dist_info) -> _Work:
        matrices = prunable_matrices(model_config, prune_cfg.modules)
        modules = list(dict.fromkeys(m.module for m in matrices))
        groups = {
            m.name: group_of(m, adapted_rows(adapter_config, m) is not None, prune_cfg.grouping) for m in matrices
        }
        mine = [module for i, module in enumerate(modules) if i % dist_info.world_size == dist_info.rank]
        return cls(matrices, groups, modules, mine)

    def of_module(self, module: str) -> list[PrunableMatrix]:
        return [m for m in self.matrices if m.module == module]

    def in_group(self, group: str) -> list[PrunableMatrix]:
        return [m for m in self.matrices if self.groups[m.name] == group]


def _owned_scores(prune_cfg, files: ModelFiles, adapter, work: _Work, seed: int, input_norms) -> dict:
    """group -> matrix name -> element scores, for the matrices of the modules this rank owns."""
    adapter_config, adapter_tensors = adapter
    scores: dict[str, dict[str, torch.Tensor]] = {}
    for module in work.mine:
        matrices = work.of_module(module)
        w0 = file_to_out_in(files.get(files.key(module)), matrices[0].conv1d).float()
        delta = layer_delta(adapter_config, adapter_tensors, module) if module in adapter_config["layers"] else None
        norm = input_norms.get(module) if input_norms else None
        for m in matrices:
            d = m.rows_of(delta) if delta is not None and adapted_rows(adapter_config, m) is not None else None
            scores.setdefault(work.groups[m.name], {})[m.name] = element_scores(
                prune_cfg.score, m.rows_of(w0), d, seed=seed, name=m.name, input_norm=norm
            )
    return scores


def _group_masks(prune_cfg, group: str, members: list[PrunableMatrix], scores: dict, dense: list[str]):
    """(pruned-entry masks of this rank's matrices of the group, the group's ratio, entries pruned over all
    ranks): N:M groups, the lowest of each row, or one global threshold (collective: all-reduced histograms)."""
    ratio = prune_cfg.group_ratios.get(group, prune_cfg.ratio)
    pattern = prune_cfg.nm_pattern
    if pattern:
        n_keep, m_group = pattern
        k = sum(m.numel * (m_group - n_keep) // m_group for m in members if m.name not in dense)
        masks = {
            name: torch.zeros_like(s, dtype=torch.bool) if name in dense else lowest_per_group_of_m(s, n_keep, m_group)
            for name, s in scores.items()
        }
        return masks, 1 - n_keep / m_group, k
    if prune_cfg.grouping == "row":
        k = sum(m.rows[1] * round(ratio * m.in_features) for m in members)
        return {name: lowest_per_row(s, ratio) for name, s in scores.items()}, ratio, k
    k = round(ratio * sum(m.numel for m in members))
    return lowest_k_masks(scores, [m.name for m in members], k), ratio, k


def _select_pruned(prune_cfg, work: _Work, scores: dict, log) -> tuple[dict, dict, list[str]]:
    """(matrix name -> pruned-entry mask for this rank's matrices, per-group statistics, the matrices an N:M
    pattern leaves dense)."""
    pattern = prune_cfg.nm_pattern
    dense = [m.name for m in work.matrices if pattern and m.in_features % pattern[1]]
    if dense:
        widths = {m.name: m.in_features for m in work.matrices}
        log(
            f"prune: pattern {pattern[0]}:{pattern[1]}: {len(dense)} matrices left dense, their input width not a "
            f"multiple of {pattern[1]}: " + ", ".join(f"{name} ({widths[name]})" for name in dense)
        )
    pruned: dict[str, torch.Tensor] = {}
    group_stats = {}
    for group in sorted(set(work.groups.values())):
        members = work.in_group(group)
        masks, ratio, k = _group_masks(prune_cfg, group, members, scores.get(group, {}), dense)
        pruned.update(masks)
        total = sum(m.numel for m in members)
        group_stats[group] = {"ratio": ratio, "pruned": k, "numel": total, "matrices": len(members)}
        by_row = prune_cfg.grouping == "row"
        how = f", {pattern[0]} of every {pattern[1]} inputs of a row kept" if pattern else ", per output row" * by_row
        log(
            f"prune: group '{group}': {k:,} of {total:,} entries ({100.0 * k / max(total, 1):.2f}%) "
            f"over {len(members)} matrices{how}, score '{prune_cfg.score}'"
        )
    return pruned, group_stats, dense


def _pruned_module(files: ModelFiles, adapter_config: dict, work: _Work, module: str, pruned: dict):
    """(the module's pruned weight as stored, the keep mask of its adapted rows or None, its matrices' stats)."""
    matrices = work.of_module(module)
    conv1d = matrices[0].conv1d
    w = file_to_out_in(files.get(files.key(module)), conv1d).clone()
    stats = {}
    for m in matrices:
        rows = m.row_index()
        w[rows] = w[rows].masked_fill(pruned[m.name], 0)
        count = int(pruned[m.name].sum())
        stats[m.name] = {"kind": m.kind, "group": work.groups[m.name], "pruned": count, "numel": m.numel}
    meta = adapter_config["layers"].get(module)
    keep = None
    if meta is not None:
        keep = torch.ones(len(meta["slices"]), meta["slices"][0][1], meta["in_features"], dtype=torch.bool)
        for m in matrices:
            i = adapted_rows(adapter_config, m)
            if i is not None:
                keep[i, slice_positions(adapter_config, m, i)] = ~pruned[m.name]
    return out_in_to_file(w, conv1d), keep, stats


def _report(prune_cfg, work: _Work, group_stats: dict, dense: list[str], stats: dict, adapter_config: dict) -> dict:
    pattern = prune_cfg.nm_pattern
    return {
        "method": "unstructured",
        "score": prune_cfg.score,
        "grouping": prune_cfg.grouping,
        "pattern": f"{pattern[0]}:{pattern[1]}" if pattern else None,
        "dense_matrices": dense,
        "groups": group_stats,
        "matrices": {m.name: stats[m.name] for m in work.matrices},
        "total": {"pruned": sum(s["pruned"] for s in stats.values()), "numel": sum(s["numel"] for s in stats.values())},
        "masks": MASKS_GLOB if adapter_config["layers"] else None,
    }


def prune_unstructured(
    prune_cfg,
    base_dir: str,
    adapter: tuple[dict, dict],
    target: Path,
    dist_info,
    *,
    seed: int,
    log=logger.info,
    input_norms: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Collective. Writes the pruned model to `target`; returns the report (on every rank). `input_norms`: per
    module, the calibration norms of its input features (`calibration.input_norms`), for score `activation`."""
    from transformers import AutoConfig

    adapter_config = adapter[0]
    files = ModelFiles(base_dir)
    model_config = AutoConfig.from_pretrained(base_dir)
    work = _Work.of(prune_cfg, model_config, adapter_config, dist_info)
    # 1. Scores of the modules this rank owns; 2. what each group loses; 3. the pruned weights and the masks of
    # the adapted rows, for the modules this rank owns.
    scores = _owned_scores(prune_cfg, files, adapter, work, seed, input_norms)
    pruned, group_stats, dense = _select_pruned(prune_cfg, work, scores, log)
    del scores
    my_tensors, my_masks, my_stats = {}, {}, {}
    for module in work.mine:
        my_tensors[files.key(module)], keep, module_stats = _pruned_module(files, adapter_config, work, module, pruned)
        my_stats.update(module_stats)
        if keep is not None:
            my_masks[f"{module}.keep"] = keep
    stats: dict[str, dict] = {}
    for part in process_group.all_gather_object(my_stats):
        stats.update(part)
    report = _report(prune_cfg, work, group_stats, dense, stats, adapter_config)

    def rank_zero_files(tmp: Path) -> None:
        model_config.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))

    write_pruned_model(
        target,
        files,
        my_tensors,
        {files.key(m) for m in work.modules},
        rank_zero_files,
        dist_info,
        extra_shards={MASKS_PATTERN.format(rank=dist_info.rank): my_masks} if my_masks else {},
    )
    return report


def read_report(model_dir: Path) -> dict | None:
    path = Path(model_dir) / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
