"""Reading a Hugging Face model directory one tensor at a time, and writing a pruned copy from several ranks.

A pruned model is written as a sharded safetensors directory: rank r writes the modules it owns to
`model-<r+1>-of-<W+1>.safetensors`, rank 0 the untouched tensors to the last shard plus the index,
config and tokenizer files. No rank ever loads the whole model. Everything goes to `<target>.partial`
and is renamed to `<target>` only when every rank has finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsee_dist.engine import process_group
from dsee_dist.errors import DSEEError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
INDEX_FILE = "model.safetensors.index.json"


class ModelFiles:
    """The tensors of a local model directory (single or sharded safetensors), read lazily."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if (self.dir / INDEX_FILE).is_file():
            weight_map = json.loads((self.dir / INDEX_FILE).read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(str(self.dir / "model.safetensors"), framework="pt") as f:
                weight_map = {key: "model.safetensors" for key in f.keys()}
        else:
            raise DSEEError(
                f"pruning reads the base model's safetensors files, and '{self.dir}' has none; "
                f"save the model with save_pretrained(safe_serialization=True) into a local directory"
            )
        self.weight_map: dict[str, str] = weight_map

    def key(self, module: str, tensor: str = "weight") -> str:
        """File key of a model module's tensor: the module's own name, or without its first component (the
        original GPT-2 files say 'h.0.attn.c_attn.weight' for 'transformer.h.0.attn.c_attn')."""
        full = f"{module}.{tensor}"
        if full in self.weight_map:
            return full
        short = full.split(".", 1)[-1]
        if short in self.weight_map:
            return short
        if tensor != "weight":
            return full  # an absent bias: callers check `has`
        raise DSEEError(f"'{self.dir}' has no tensor '{full}'; is it the model the config names?")

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.dir / self.weight_map[key]), framework="pt") as f:
            return f.get_tensor(key)

    def keys(self) -> list[str]:
        return list(self.weight_map)


def copy_side_files(source: Path, target: Path) -> None:
    """Tokenizer, generation config and the like: every file but weights, index and config.json."""
    for path in source.iterdir():
        if (
            path.is_file()
            and not path.name.endswith(WEIGHT_SUFFIXES)
            and path.name not in (INDEX_FILE, "config.json")
            and not path.name.startswith("dsee_")
        ):
            shutil.copyfile(path, target / path.name)


def write_pruned_model(
    target: Path,
    files: ModelFiles,
    my_tensors: dict[str, torch.Tensor],
    replaced: set[str],
    write_rank_zero_files,
    dist_info,
    extra_shards: dict[str, dict[str, torch.Tensor]] = (),
) -> None:
    """Collective. `my_tensors`: this rank's pruned tensors by file key; `replaced`: every key any rank
    replaces (or drops); `write_rank_zero_files(tmp_dir)`: config, report and the like (rank 0);
    `extra_shards`: more safetensors files this rank writes (name -> tensors), e.g. pruning masks."""
    target = Path(target)
    tmp = target.with_name(target.name + ".partial")
    rank, world = dist_info.rank, dist_info.world_size
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    process_group.barrier()
    shard = f"model-{rank + 1:05d}-of-{world + 1:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in my_tensors.items()}, str(tmp / shard), metadata={"format": "pt"})
    for name, tensors in dict(extra_shards).items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
    written = {k: shard for k in my_tensors}
    if rank == 0:
        rest_shard = f"model-{world + 1:05d}-of-{world + 1:05d}.safetensors"
        rest = {k: files.get(k).contiguous() for k in files.keys() if k not in replaced}
        save_file(rest, str(tmp / rest_shard), metadata={"format": "pt"})
        written.update({k: rest_shard for k in rest})
        my_tensors = {**my_tensors, **rest}
    sizes = sum(v.numel() * v.element_size() for v in my_tensors.values())
    parts = process_group.all_gather_object((written, sizes))
    if rank == 0:
        weight_map, total = {}, 0
        for part_written, part_sizes in parts:
            weight_map.update(part_written)
            total += part_sizes
        (tmp / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1)
        )
        copy_side_files(files.dir, tmp)
        write_rank_zero_files(tmp)
    process_group.barrier()
    if rank == 0:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    process_group.barrier()
