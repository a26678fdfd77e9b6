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
from pathlib import Path

import torch

from dsee_dist.dsee.adapter import layer_delta
from dsee_dist.dsee.layer import row_slots, slice_rows
from dsee_dist.engine import process_group
from dsee_dist.pruning.model_files import ModelFiles, write_pruned_model
from dsee_dist.pruning.scores import element_scores
from dsee_dist.pruning.selection import lowest_k_masks
from dsee_dist.pruning.targets import PrunableMatrix, file_to_out_in, out_in_to_file, prunable_matrices

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


def prune_unstructured(
    prune_cfg,
    base_dir: str,
    adapter: tuple[dict, dict],
    target: Path,
    dist_info,
    *,
    seed: int,
    log=print,
    input_norms: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Collective. Writes the pruned model to `target`; returns the report (on every rank). `input_norms`: per
    module, the calibration norms of its input features (`calibration.input_norms`), for score `activation`."""
    from transformers import AutoConfig

    adapter_config, adapter_tensors = adapter
    files = ModelFiles(base_dir)
    model_config = AutoConfig.from_pretrained(base_dir)
    matrices = prunable_matrices(model_config, prune_cfg.modules)
    modules = list(dict.fromkeys(m.module for m in matrices))
    conv1d = {m.module: m.conv1d for m in matrices}
    owner = {module: i % dist_info.world_size for i, module in enumerate(modules)}
    mine = [m for m in modules if owner[m] == dist_info.rank]
    groups = {m.name: group_of(m, adapted_rows(adapter_config, m) is not None, prune_cfg.grouping) for m in matrices}
    by_name = {m.name: m for m in matrices}

    # 1. Scores of the modules this rank owns.
    scores: dict[str, dict[str, torch.Tensor]] = {}
    for module in mine:
        w0 = file_to_out_in(files.get(files.key(module)), conv1d[module]).float()
        delta = layer_delta(adapter_config, adapter_tensors, module) if module in adapter_config["layers"] else None
        norm = input_norms.get(module) if input_norms else None
        for m in (m for m in matrices if m.module == module):
            d = m.rows_of(delta) if delta is not None and adapted_rows(adapter_config, m) is not None else None
            scores.setdefault(groups[m.name], {})[m.name] = element_scores(
                prune_cfg.score, m.rows_of(w0), d, seed=seed, name=m.name, input_norm=norm
            )

    # 2. One global threshold per group, the lowest of each row, or the lowest of each group of M inputs of a row
    # (the last two need no other rank's scores).
    pruned: dict[str, torch.Tensor] = {}
    group_stats = {}
    by_row = prune_cfg.grouping == "row"
    pattern = prune_cfg.nm_pattern
    dense = [m.name for m in matrices if pattern and m.in_features % pattern[1]]
    if dense:
        log(
            f"prune: pattern {pattern[0]}:{pattern[1]}: {len(dense)} matrices left dense, their input width not a "
            f"multiple of {pattern[1]}: " + ", ".join(f"{name} ({by_name[name].in_features})" for name in dense)
        )
    for group in sorted(set(groups.values())):
        order = [m.name for m in matrices if groups[m.name] == group]
        total = sum(m.numel for m in matrices if groups[m.name] == group)
        ratio = prune_cfg.group_ratios.get(group, prune_cfg.ratio)
        if pattern:
            n_keep, m_group = pattern
            ratio = 1 - n_keep / m_group
            k = sum(
                m.numel * (m_group - n_keep) // m_group
                for m in matrices
                if groups[m.name] == group and m.name not in dense
            )
            pruned.update(
                {
                    name: torch.zeros_like(s, dtype=torch.bool)
                    if name in dense
                    else lowest_per_group_of_m(s, n_keep, m_group)
                    for name, s in scores.get(group, {}).items()
                }
            )
        elif by_row:
            k = sum(m.rows[1] * round(ratio * m.in_features) for m in matrices if groups[m.name] == group)
            pruned.update({name: lowest_per_row(s, ratio) for name, s in scores.get(group, {}).items()})
        else:
            k = round(ratio * total)
            pruned.update(lowest_k_masks(scores.get(group, {}), order, k))
        group_stats[group] = {"ratio": ratio, "pruned": k, "numel": total, "matrices": len(order)}
        how = f", {pattern[0]} of every {pattern[1]} inputs of a row kept" if pattern else ", per output row" * by_row
        log(
            f"prune: group '{group}': {k:,} of {total:,} entries ({100.0 * k / max(total, 1):.2f}%) "
            f"over {len(order)} matrices{how}, score '{prune_cfg.score}'"
        )
    del scores

    # 3. The pruned weights and the masks of the adapted rows, for the modules this rank owns.
    my_tensors, my_masks, my_stats = {}, {}, {}
    for module in mine:
        key = files.key(module)
        w = file_to_out_in(files.get(key), conv1d[module]).clone()
        module_matrices = [m for m in matrices if m.module == module]
        for m in module_matrices:
            rows = m.row_index()
            w[rows] = w[rows].masked_fill(pruned[m.name], 0)
            my_stats[m.name] = {
                "kind": m.kind,
                "group": groups[m.name],
                "pruned": int(pruned[m.name].sum()),
                "numel": m.numel,
            }
        my_tensors[key] = out_in_to_file(w, conv1d[module])
        meta = adapter_config["layers"].get(module)
        if meta is not None:
            keep = torch.ones(len(meta["slices"]), meta["slices"][0][1], meta["in_features"], dtype=torch.bool)
            for m in module_matrices:
                i = adapted_rows(adapter_config, m)
                if i is not None:
                    keep[i, slice_positions(adapter_config, m, i)] = ~pruned[m.name]
            my_masks[f"{module}.keep"] = keep
    stats: dict[str, dict] = {}
    for part in process_group.all_gather_object(my_stats):
        stats.update(part)
    report = {
        "method": "unstructured",
        "score": prune_cfg.score,
        "grouping": prune_cfg.grouping,
        "pattern": f"{pattern[0]}:{pattern[1]}" if pattern else None,
        "dense_matrices": dense,
        "groups": group_stats,
        "matrices": {m.name: stats[m.name] for m in matrices},
        "total": {"pruned": sum(s["pruned"] for s in stats.values()), "numel": sum(s["numel"] for s in stats.values())},
        "masks": MASKS_GLOB if adapter_config["layers"] else None,
    }

    def rank_zero_files(tmp: Path) -> None:
        model_config.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))

    write_pruned_model(
        target,
        files,
        my_tensors,
        {files.key(m) for m in modules},
        rank_zero_files,
        dist_info,
        extra_shards={MASKS_PATTERN.format(rank=dist_info.rank): my_masks} if my_masks else {},
    )
    return report


def read_report(model_dir: Path) -> dict | None:
    path = Path(model_dir) / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
