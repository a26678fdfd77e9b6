"""Stage 2 of the two-stage recipe: the DSEE model on the pruned base, started from the stage-1 update.

- `write_support_from_adapter`: the support of S is the stage-1 adapter's (restricted to what pruning
  kept), written as the stage's `support.safetensors` so restarts and exports read the same one.
- `copy_adapter_values`: A, B and the sparse values of the stage-1 adapter into the new layers.
- `attach_keep_masks`: after unstructured pruning, the mask of each adapted module's rows, created
  partitioned under ZeRO-3 (one module at a time), so (W0 + ΔW) * M is what trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsee_dist.dsee.inject import TargetSpec, dsee_layers
from dsee_dist.dsee.layer import row_slots
from dsee_dist.dsee.placement import SUPPORT_FILE, support_settings
from dsee_dist.engine import zero
from dsee_dist.errors import DSEEError
from dsee_dist.pruning.unstructured import MASKS_GLOB
from dsee_dist.utils.files import atomic_path


def support_from_adapter(adapter: tuple[dict, dict], specs: list[TargetSpec]) -> dict[str, torch.Tensor]:
    """{matrix name: slice-local (2 x N) index} from the adapter's layer-level indices."""
    config, tensors = adapter
    support = {}
    for spec in specs:
        if spec.name not in config["layers"]:
            raise DSEEError(f"the stage-1 adapter has no layer '{spec.name}'; stage 2 must adapt the same modules")
        index = tensors[f"{spec.name}.sparse_index"]
        for rows_spec, matrix in zip(spec.slices, spec.matrix_names()):
            local = row_slots([rows_spec], spec.out_features)[index[0]]
            inside = local >= 0
            support[matrix] = torch.stack([local[inside], index[1][inside]]).contiguous()
    return support


def write_support_from_adapter(
    adapter: tuple[dict, dict], specs: list[TargetSpec], dsee_cfg, seed: int, out_dir: Path
) -> None:
    path = Path(out_dir) / SUPPORT_FILE
    if path.is_file():
        return
    with atomic_path(path) as tmp:
        save_file(
            support_from_adapter(adapter, specs),
            str(tmp),
            metadata={"dsee_support": json.dumps(support_settings(dsee_cfg, seed, specs))},
        )


def copy_adapter_values(model, tensors: dict[str, torch.Tensor]) -> None:
    """Before the engine exists (the adapter parameters are still whole on every rank)."""
    with torch.no_grad():
        for name, layer in dsee_layers(model).items():
            if not torch.equal(layer.sparse_index, tensors[f"{name}.sparse_index"].to(layer.sparse_index.dtype)):
                raise DSEEError(
                    f"stage 2: the support of '{name}' does not match the stage-1 adapter; "
                    f"delete the stage-2 output directory to start stage 2 again"
                )
            for key, param in layer.adapter_params().items():
                param.copy_(tensors[f"{name}.{key}"].to(param.dtype))


def keep_mask_files(model_dir: Path) -> dict[str, Path]:
    """{adapted module: file holding its keep mask} of a pruned model directory."""
    found = {}
    for path in sorted(Path(model_dir).glob(MASKS_GLOB)):
        with safe_open(str(path), framework="pt") as f:
            found.update({key[: -len(".keep")]: path for key in f.keys()})
    return found


def read_keep_mask(path: Path, module: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(module + ".keep")


def attach_keep_masks(model, model_dir: Path, ds_config: dict | None) -> tuple[int, int]:
    """Give every adapted module with a stored mask its PruneMask. Collective under ZeRO-3.
    Returns (masks attached, how many of them are partitioned across ranks)."""
    files = keep_mask_files(model_dir)
    create = zero.partitioned_init(ds_config)  # a fresh zero.Init context per module under ZeRO-3
    count = partitioned = 0
    for name, layer in dsee_layers(model).items():
        if name not in files:
            continue
        layer.attach_prune_mask(
            read_keep_mask(files[name], name),
            create_context=create() if create else None,
            gathered=zero.gathered,
        )
        count += 1
        partitioned += zero.is_partitioned(layer.prune_mask.mask)
    return count, partitioned
