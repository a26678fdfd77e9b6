"""Finding target modules, swapping DSEE layers in, and freezing everything else.

`auto` targets come from the model family (dsee_dist.models.families). Matching follows PEFT's
predictable rules: an exclude wins; a plain entry matches a module whose full name equals it or ends
with "." + entry; an entry starting with "re:" is a regular expression that must match the whole name.
A target list that matches nothing is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from dsee_dist.dsee.layer import DSEELayer, PruneMask, base_shape, is_conv1d, slice_rows
from dsee_dist.dsee.support import matrix_generator
from dsee_dist.engine import zero
from dsee_dist.errors import ConfigError
from dsee_dist.models.families import family_of
from dsee_dist.models.shape import model_shape

SLICE_ORDER = ("q", "k", "v")


@dataclass(frozen=True)
class TargetSpec:
    """One adapted module: its name, shape and the row blocks (slices) adapted as separate matrices."""

    name: str
    out_features: int
    in_features: int
    slices: tuple[tuple[int, ...], ...]  # row sets in W's (out x in) layout: (start, size[, block, stride])
    slice_names: tuple[str, ...]  # "q"/"k"/"v" for fused projections, "" for a whole matrix

    def matrix_names(self) -> list[str]:
        return [f"{self.name}.{s}" if s else self.name for s in self.slice_names]


def name_matches(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


AUTO = "auto"


def is_auto(target_modules) -> bool:
    return target_modules == AUTO or list(target_modules) == [AUTO]


def resolve_targets(model: nn.Module, target_modules, fused_slices) -> tuple[list[str], list[str] | None]:
    """(target module patterns, fused slices or None for the family's) with `auto` replaced by the model
    family's q and v projections; an unknown family with `auto` is a ConfigError naming the fix."""
    if not is_auto(target_modules):
        return list(target_modules), (None if fused_slices == AUTO else list(fused_slices))
    family = family_of(getattr(model, "config", None), purpose="dsee.target_modules=auto")
    targets, slices = family.auto_targets()
    return targets, (slices if fused_slices in (AUTO, None) or not family.is_fused() else list(fused_slices))


def _fused_layout(model: nn.Module, name: str, module: nn.Module) -> dict[str, tuple] | None:
    """Slice tuples of q, k, v when `module` is its family's fused q/k/v projection, else None."""
    config = getattr(model, "config", None)
    family = family_of(config, required=False)
    if family is None or not family.is_fused() or not name.endswith("." + family.q):
        return None
    shape = model_shape(config)
    layer = int(name[: -len(family.q) - 1].rsplit(".", 1)[-1])
    layout = shape.qkv_rows(layer)
    out_features, _ = base_shape(module)
    widths = shape.q_width(layer) + 2 * shape.kv_width(layer)
    return {kind[-1]: rows for kind, rows in layout.items()} if out_features == widths else None


def find_targets(model: nn.Module, target_modules, fused_slices, exclude_modules: list[str] = ()) -> list[TargetSpec]:
    """The modules to adapt, in model order. `target_modules` may be `auto` (the family's q and v);
    `fused_slices` (which of q, k, v of a fused projection to adapt, each as its own matrix; [] = the fused
    matrix as one) applies to GPT-2's `c_attn` and GPT-NeoX's `query_key_value`. Raises ConfigError when
    nothing usable matches."""
    target_modules, fused_slices = resolve_targets(model, target_modules, fused_slices)
    if fused_slices is None:
        fused_slices = ["q", "v"]
    specs, skipped = [], []
    for name, module in model.named_modules():
        if isinstance(module, DSEELayer) or not name_matches(name, target_modules):
            continue
        if name_matches(name, list(exclude_modules)):
            continue
        try:
            out_features, in_features = base_shape(module)
        except TypeError:
            skipped.append(f"{name} ({type(module).__name__})")
            continue
        layout = _fused_layout(model, name, module) if fused_slices else None
        if layout is not None:
            names = tuple(s for s in SLICE_ORDER if s in fused_slices)
            slices = tuple(layout[s] for s in names)
        else:
            names, slices = ("",), ((0, out_features),)
        specs.append(TargetSpec(name, out_features, in_features, slices, names))
    if not specs:
        hint = f"; matched but not adaptable: {', '.join(skipped[:3])}" if skipped else ""
        examples = sorted(
            {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
        )
        raise ConfigError(
            f"dsee.target_modules {target_modules} match no adaptable module{hint}; "
            f"this model's linear layers are named: {', '.join(examples[:12])}"
        )
    return specs


def check_num_sparse(specs: list[TargetSpec], num_sparse: int) -> None:
    for spec in specs:
        rows = spec.slices[0][1]
        if num_sparse > rows * spec.in_features:
            raise ConfigError(
                f"dsee.num_sparse={num_sparse} is larger than the {rows} x {spec.in_features} matrix "
                f"{spec.matrix_names()[0]}; use at most {rows * spec.in_features}"
            )


def check_rank(specs: list[TargetSpec], rank: int) -> None:
    for spec in specs:
        limit = min(spec.slices[0][1], spec.in_features)
        if rank > limit:
            raise ConfigError(
                f"dsee.lora_rank={rank} exceeds min(out, in)={limit} of {spec.matrix_names()[0]}; use at most {limit}"
            )


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_dsee(
    model: nn.Module,
    specs: list[TargetSpec],
    support: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    seed: int,
) -> dict[str, DSEELayer]:
    """Replace each target with a DSEELayer; `support[matrix_name]` is its (2 x N) index, slice-local.

    A is drawn from a generator seeded by (seed, module name), so every rank, world size and ZeRO
    stage builds identical adapters."""
    layers = {}
    for spec in specs:
        base = model.get_submodule(spec.name)
        parts = []
        for rows_spec, matrix in zip(spec.slices, spec.matrix_names()):
            idx = support.get(matrix)
            if idx is not None and idx.numel():
                parts.append(torch.stack([slice_rows(rows_spec)[idx[0]], idx[1]]))
        index = torch.cat(parts, dim=1) if parts else None
        layer = DSEELayer(
            base,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            slices=list(spec.slices),
            sparse_index=index,
            generator=matrix_generator(seed, spec.name + ".lora_a"),
        )
        set_submodule(model, spec.name, layer)
        layers[spec.name] = layer
    return layers


def mark_only_adapters_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything; then unfreeze A, B and the sparse values. Returns the trainable parameters."""
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = []
    for module in model.modules():
        if isinstance(module, DSEELayer):
            for param in module.adapter_params().values():
                param.requires_grad_(True)
                trainable.append(param)
    return trainable


def dsee_layers(model: nn.Module) -> dict[str, DSEELayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DSEELayer)}


def _numel(param: nn.Parameter) -> int:
    return getattr(param, "ds_numel", None) or param.numel()  # partitioned ZeRO-3 tensors look empty


def _prune_mask_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, PruneMask) for p in m.parameters()}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) model parameters; correct under ZeRO-3. The frozen 0/1 keep masks of a pruned
    model's stage 2 are bookkeeping, not weights, and count in neither (see `count_prune_mask_entries`)."""
    masks = _prune_mask_params(model)
    trainable = total = 0
    for param in model.parameters():
        if id(param) in masks:
            continue
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def count_prune_mask_entries(model: nn.Module) -> tuple[int | None, int]:
    """(kept, total) entries of the keep masks attached to the model's DSEE layers; (0, 0) without masks.
    `kept` is None when a mask is partitioned (ZeRO-3): its values are then only known after gathering."""
    masks = [m.mask for m in model.modules() if isinstance(m, PruneMask)]
    total = sum(_numel(mask) for mask in masks)
    if any(zero.is_partitioned(mask) for mask in masks):
        return None, total
    return sum(int(mask.count_nonzero()) for mask in masks), total


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    layers = dsee_layers(model)
    n_sparse = sum(layer.num_sparse for layer in layers.values())
    summary = (
        f"trainable params: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.4f}%) "
        f"in {len(layers)} DSEE layers ({n_sparse:,} sparse values)"
    )
    kept, mask_total = count_prune_mask_entries(model)
    if mask_total:
        summary += f"; keep masks over {mask_total:,} adapted weights (not counted above)"
        if kept is not None:
            summary += f", {kept:,} kept ({100.0 * kept / mask_total:.2f}%)"
    return summary
