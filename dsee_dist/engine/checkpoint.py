"""Sharded checkpoints with exact resume.

Layout under `output.dir/checkpoints/`:

    step_00000040/                      one complete checkpoint (a DeepSpeed tag)
        zero_pp_rank_*_model_states.pt  DeepSpeed's files: trainable parameters only
        *_optim_states.pt               ZeRO-partitioned optimizer state, one file per rank
        rng_rank_00000.pt ...           every rank's RNG states
        support.safetensors             the sparse support (never recomputed on resume)
        trainer_state.json              step, world size, resolved config
        dsee_manifest.json              size and sha256 of every file above; written last
    latest                              the tag of the newest complete checkpoint
    zero_to_fp32.py                     DeepSpeed's consolidation script

A save goes to `step_N.partial/`; after every rank has finished (a barrier), rank 0 writes the
manifest, renames the directory to `step_N` and only then moves `latest`. A crash or kill -9 during a
save therefore never touches the previous checkpoint, and a half-written one is never loaded.
The frozen base is not rewritten (`exclude_frozen_parameters=True`): it is recovered from
`model.path` (or the built-in model directory) and the support stored here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsee_dist.config import global_batch_size
from dsee_dist.engine import process_group
from dsee_dist.errors import DSEEError
from dsee_dist.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "dsee_manifest.json"
BEST = "best.json"  # the checkpoint.keep_best checkpoint, written by dsee_dist/eval/during_training.py
TRAINER_STATE = "trainer_state.json"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")

# Config sections whose change makes a checkpoint meaningless for this run (the trained tensors would not
# fit, or the data order would change under them). The global batch (micro x accum x world size) must
# match too; how it is split may change. Everything else (steps, eval, logging, the engine JSON) may
# change on resume.
MUST_MATCH = ("model", "dsee", "data", "train.seed")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine,
    out_dir: Path,
    step: int,
    *,
    config: dict,
    dist_info,
    keep_last: int,
    base_model: str,
    extra_files: dict[str, Path] = (),
) -> Path:
    """Collective: every rank calls it. Returns the directory of the complete checkpoint."""
    root = checkpoint_root(out_dir)
    tag = tag_for(step)
    partial = tag + ".partial"
    if dist_info.is_rank_zero:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / partial, ignore_errors=True)  # left by a save that was killed
    process_group.barrier()
    write_rank_shards(engine, root / partial, step, dist_info)
    process_group.barrier()  # every rank's shards are on disk
    final = root / tag
    if dist_info.is_rank_zero:
        for name, source in dict(extra_files).items():
            shutil.copyfile(source, root / partial / name)
        (root / partial / TRAINER_STATE).write_text(
            json.dumps(
                {
                    "step": step,
                    "world_size": dist_info.world_size,
                    "zero_stage": engine.zero_optimization_stage(),
                    "base_model": base_model,
                    "config": config,
                },
                indent=1,
            )
        )
        files = sorted(p for p in (root / partial).rglob("*") if p.is_file())
        manifest = {
            str(p.relative_to(root / partial)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files
        }
        (root / partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(root / partial, final)
        write_text_atomic(root / LATEST, tag)
        _prune(root, keep_last)
        logger.info(f"checkpoint: step {step} saved to {final}")
    process_group.barrier()
    return final


def write_rank_shards(engine, partial_dir: Path, step: int, dist_info) -> None:
    """This rank's part of a checkpoint (DeepSpeed's shards, its RNG state) into the uncommitted directory."""
    client_state = {"dsee_step": step, "dsee_world_size": dist_info.world_size}
    engine.save_checkpoint(
        str(partial_dir.parent),
        tag=partial_dir.name,
        client_state=client_state,
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    torch.save(_rng_state(), partial_dir / f"rng_rank_{dist_info.rank:05d}.pt")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories (manifest present), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(TAG_PATTERN.match(p.name).group(1)))


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    best = json.loads((root / BEST).read_text()).get("tag") if (root / BEST).is_file() else None
    for old in complete_checkpoints(root)[:-keep_last]:
        if old.name != best:  # checkpoint.keep_best: the best one stays
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    """Raise DSEEError naming the first missing, truncated or corrupt file of a checkpoint."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DSEEError(f"checkpoint '{path}' is incomplete (no {MANIFEST}): its save did not finish")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise DSEEError(f"checkpoint '{path}': {MANIFEST} is corrupt") from None
    for name, expected in manifest.items():
        f = path / name
        if not f.is_file():
            raise DSEEError(f"checkpoint '{path}' is missing {name}")
        if f.stat().st_size != expected["bytes"]:
            raise DSEEError(f"checkpoint file '{f}' is truncated ({f.stat().st_size} of {expected['bytes']} bytes)")
        if _sha256(f) != expected["sha256"]:
            raise DSEEError(f"checkpoint file '{f}' is corrupt (checksum mismatch)")


def find_resume_checkpoint(out_dir: Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete, intact checkpoint (falling back past corrupt ones), or None.
    A path: that checkpoint, which must be intact."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and (path / LATEST).is_file():  # a checkpoints/ root or an output dir
            path = path / (path / LATEST).read_text().strip()
        elif path.is_dir() and (path / CHECKPOINT_DIR / LATEST).is_file():
            path = path / CHECKPOINT_DIR / (path / CHECKPOINT_DIR / LATEST).read_text().strip()
        if not path.is_dir():
            raise DSEEError(f"resume checkpoint '{resume}' does not exist; give a checkpoint directory or resume=auto")
        verify_checkpoint(path)
        return path
    root = checkpoint_root(out_dir)
    for candidate in reversed(complete_checkpoints(root)):
        try:
            verify_checkpoint(candidate)
            return candidate
        except DSEEError as exc:
            logger.warning(f"resume: {exc}; falling back to the previous checkpoint")
    return None


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys under MUST_MATCH whose values differ between two resolved configs."""

    def flatten(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flatten(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flatten(saved), flatten(current)
    keys = sorted(k for k in set(a) | set(b) if any(k == m or k.startswith(m + ".") for m in MUST_MATCH))
    return [k for k in keys if a.get(k) != b.get(k)]


@dataclass
class ResumeInfo:
    path: Path
    step: int
    world_size: int
    zero_stage: int
    base_model: str
    config: dict


def read_trainer_state(path: Path) -> ResumeInfo:
    state = json.loads((path / TRAINER_STATE).read_text())
    return ResumeInfo(
        path, state["step"], state["world_size"], state["zero_stage"], state["base_model"], state["config"]
    )


def global_batch(config: dict, world_size: int) -> int:
    return global_batch_size(config["train"]["micro_batch_size"], config["train"]["grad_accum_steps"], world_size)


def check_compatible(info: ResumeInfo, current_config: dict, world_size: int) -> None:
    differing = [
        f"{k}: {_get(info.config, k)!r} -> {_get(current_config, k)!r}"
        for k in config_differences(info.config, current_config)
    ]
    saved_batch, batch = global_batch(info.config, info.world_size), global_batch(current_config, world_size)
    if saved_batch != batch:
        differing.append(f"global batch (micro_batch_size x grad_accum_steps x world size): {saved_batch} -> {batch}")
    if differing:
        raise DSEEError(
            f"cannot resume from '{info.path}': the config differs in {'; '.join(differing[:6])}; "
            f"restore those settings or start a new output.dir"
        )


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def load_checkpoint(engine, info: ResumeInfo, dist_info) -> bool:
    """Restore engine (trainable parameters, optimizer, LR scheduler) and this rank's RNG states.

    DeepSpeed loads its own checkpoint when the partitioning is unchanged (same world size and ZeRO
    stage; stage 0 is never partitioned). Otherwise the trainable state is resharded; returns whether it was."""
    stage = engine.zero_optimization_stage()
    same_partitioning = info.zero_stage == stage and (info.world_size == dist_info.world_size or stage == 0)
    if not same_partitioning:
        if info.zero_stage == 0 or stage == 0:
            raise DSEEError(
                f"checkpoint '{info.path}' was written under ZeRO stage {info.zero_stage} at world size "
                f"{info.world_size}; resuming it under stage {stage} at world size {dist_info.world_size} "
                f"needs ZeRO stage >= 1 on both sides (or the original stage and world size)"
            )
        from dsee_dist.engine.reshard import load_resharded

        load_resharded(engine, info.path)
    else:
        load_path, _ = engine.load_checkpoint(
            str(info.path.parent),
            tag=info.path.name,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise DSEEError(f"DeepSpeed could not load checkpoint '{info.path}'")
    rng_file = info.path / f"rng_rank_{dist_info.rank:05d}.pt"
    if rng_file.is_file() and info.world_size == dist_info.world_size:  # one stream per rank: only meaningful 1:1
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return not same_partitioning


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metric rows logged after `step` (by a run that died after its last checkpoint)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
