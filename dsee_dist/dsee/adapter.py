"""The adapter export: `adapter/adapter_model.safetensors` + `adapter/adapter_config.json`.

Holds A, B, the sparse values and their indices for every DSEE layer, gathered from ZeRO-3
partitions (the classic failure of LoRA under ZeRO-3 is an adapter file of empty tensors).
`load_adapted_model` rebuilds the adapted model on top of the base and reproduces its outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsee_dist.dsee.inject import dsee_layers
from dsee_dist.dsee.layer import DSEELayer, delta_from_factors
from dsee_dist.engine import zero
from dsee_dist.errors import DSEEError
from dsee_dist.utils.files import atomic_directory

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


def save_adapter(model, target: Path, *, base_model: str, dsee_cfg, is_rank_zero: bool) -> None:
    """Collective: every rank must call it. Rank 0 writes `target` atomically (tmp dir + rename)."""
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = {}
    for name, layer in dsee_layers(model).items():
        params = list(layer.adapter_params().items())
        with zero.gathered([p for _, p in params]):
            if is_rank_zero:
                for key, param in params:
                    tensors[f"{name}.{key}"] = param.detach().to("cpu", torch.float32, copy=True).contiguous()
        tensors[f"{name}.sparse_index"] = layer.sparse_index.detach().cpu().contiguous()
        layers_meta[name] = {
            "out_features": layer.out_features,
            "in_features": layer.in_features,
            "slices": [list(s) for s in layer.slices],
        }
    if not is_rank_zero:
        return
    config = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "lora_rank": dsee_cfg.lora_rank,
        "lora_alpha": dsee_cfg.lora_alpha,
        "lora_dropout": dsee_cfg.lora_dropout,
        "num_sparse": dsee_cfg.num_sparse,
        "support": dsee_cfg.support,
        "layers": layers_meta,
    }
    with atomic_directory(target) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))


def zero_adapter(specs, dsee_cfg) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter on the modules of `specs` (inject.TargetSpec) whose update is exactly zero (B = 0, A = 0, no
    sparse entries), in read_adapter's form: what pruning reads when no stage tuned before it."""
    r = dsee_cfg.lora_rank
    layers, tensors = {}, {}
    for spec in specs:
        n_slices, slice_size = len(spec.slices), spec.slices[0][1]
        layers[spec.name] = {
            "out_features": spec.out_features,
            "in_features": spec.in_features,
            "slices": [list(s) for s in spec.slices],
        }
        tensors[f"{spec.name}.lora_a"] = torch.zeros(n_slices * r, spec.in_features)
        tensors[f"{spec.name}.lora_b"] = torch.zeros(n_slices, slice_size, r)
        tensors[f"{spec.name}.sparse_index"] = torch.zeros(2, 0, dtype=torch.long)
    config = {"lora_rank": r, "lora_alpha": dsee_cfg.lora_alpha, "num_sparse": 0, "layers": layers}
    return config, tensors


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise DSEEError(f"'{adapter_dir}' is not an adapter directory (no {ADAPTER_CONFIG})")
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise DSEEError(
            f"adapter '{adapter_dir}' has format_version {config.get('format_version')}; "
            f"this dsee_dist reads {FORMAT_VERSION}"
        )
    return config


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of an adapter directory."""
    return read_adapter_config(adapter_dir), load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))


def layer_delta(config: dict, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """(alpha / r)(B A + S) of one adapted module as a dense fp32 (out x in) matrix."""
    meta = config["layers"][name]
    return delta_from_factors(
        tensors[f"{name}.lora_a"].float(),
        tensors[f"{name}.lora_b"].float(),
        tensors[f"{name}.sparse_values"].float() if f"{name}.sparse_values" in tensors else None,
        tensors[f"{name}.sparse_index"],
        [tuple(s) for s in meta["slices"]],
        meta["out_features"],
        config["lora_alpha"] / config["lora_rank"],
    )


def apply_adapter(model, adapter_dir: Path) -> dict[str, DSEELayer]:
    """Wrap the adapted modules of a plain base model with DSEE layers holding the stored values."""
    from dsee_dist.dsee.inject import set_submodule

    config = read_adapter_config(adapter_dir)
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    layers = {}
    for name, meta in config["layers"].items():
        base = model.get_submodule(name)
        layer = DSEELayer(
            base,
            rank=config["lora_rank"],
            alpha=config["lora_alpha"],
            dropout=config["lora_dropout"],
            slices=[tuple(s) for s in meta["slices"]],
            sparse_index=tensors[f"{name}.sparse_index"],
        )
        with torch.no_grad():
            for key, param in layer.adapter_params().items():
                param.copy_(tensors[f"{name}.{key}"].to(param.dtype))
        set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def load_adapted_model(adapter_dir: str | os.PathLike, base_model: str | None = None, dtype=torch.float32):
    """The base model (from the adapter's record, or `base_model`) with the adapter applied, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = read_adapter_config(Path(adapter_dir))
    model = AutoModelForCausalLM.from_pretrained(base_model or config["base_model"], dtype=dtype)
    apply_adapter(model, Path(adapter_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
