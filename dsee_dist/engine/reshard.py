"""Resuming a ZeRO checkpoint at a different world size by resharding the small trainable state.

A plain ZeRO checkpoint refuses a different data-parallel size. DSEE's trainable state (A, B, the
sparse values and their Adam moments) is tiny, so instead of DeepSpeed's universal-checkpoint
conversion (which needs Megatron-style metadata in the client state) the per-rank optimizer files
are read directly and reassembled into full per-parameter tensors:

- ZeRO-1/2: each rank file maps parameter name -> (start, numel) fragment of its flat fp32
  partition (`param_slice_mappings`); a parameter's fragments, in rank order, make it whole.
- ZeRO-3: every parameter is split evenly (ceil(numel / world) per rank, zero-padded) and laid
  out in `param_shapes` order inside each rank's flat group.

The same mapping serves the fp32 master weights and both Adam moments. The new engine then gets
them through DeepSpeed's `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`, which
re-partition for the new world size. tests/distributed checks the fp32 weights against
DeepSpeed's own `zero_to_fp32` and the resumed losses against an uninterrupted run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from dsee_dist.engine import deepspeed_engine, zero
from dsee_dist.errors import DSEEError

MOMENTS = ("exp_avg", "exp_avg_sq")


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else 0


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def consolidate_trainable_state(checkpoint_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """{param name: {"fp32": full tensor, "exp_avg": ..., "exp_avg_sq": ...}} and the engine metadata
    (step, LR scheduler state) from a ZeRO-1/2/3 checkpoint directory."""
    checkpoint_dir = Path(checkpoint_dir)
    optim_files = sorted(checkpoint_dir.glob("*_optim_states.pt"), key=_rank_of)
    model_files = sorted(checkpoint_dir.glob("*model_states.pt"), key=_rank_of)
    if not optim_files or not model_files:
        raise DSEEError(f"'{checkpoint_dir}' holds no ZeRO optimizer/model state files to reshard")
    model_state = _load(model_files[0])
    param_shapes = model_state["param_shapes"]
    optim = [_load(f)["optimizer_state_dict"] for f in optim_files]
    world = len(optim)
    stage = int(optim[0]["zero_stage"])
    full: dict[str, dict[str, torch.Tensor]] = {}
    steps = set()
    for g, shapes in enumerate(param_shapes):
        if stage <= 2:
            flats = {"fp32": [o["single_partition_of_fp32_groups"][g] for o in optim]}
            states = [o["base_optimizer_state"]["state"][g] for o in optim]
        else:
            flats = {"fp32": [o["fp32_flat_groups"][g] for o in optim]}
            states = [o["optimizer_state_dict"]["state"][g] for o in optim]
        for key in MOMENTS:
            flats[key] = [s[key] for s in states]
        steps.update(int(s["step"]) for s in states)
        if stage <= 2:
            mappings = [o["param_slice_mappings"][g] for o in optim]
            for name, shape in shapes.items():
                full[name] = {
                    key: torch.cat(
                        [flat[r].narrow(0, m[name].start, m[name].numel) for r, m in enumerate(mappings) if name in m]
                    )
                    .view(shape)
                    .clone()
                    for key, flat in flats.items()
                }
        else:
            offset = 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                part = math.ceil(numel / world)
                full[name] = {
                    key: torch.cat([flat[r].narrow(0, offset, part) for r in range(world)])[:numel].view(shape).clone()
                    for key, flat in flats.items()
                }
                offset += part
    if len(steps) != 1:
        raise DSEEError(
            f"'{checkpoint_dir}': ranks disagree on the optimizer step ({sorted(steps)}); the checkpoint is corrupt"
        )
    meta = {
        "step": steps.pop(),
        "lr_scheduler": model_state.get("lr_scheduler"),
        "global_steps": model_state.get("global_steps", 0),
        "global_samples": model_state.get("global_samples", 0),
    }
    return full, meta


def _ensure_optimizer_state(engine) -> None:
    """Adam creates its state at the first step; create it (zeros) now so it can be written into, and
    let ZeRO-1/2 re-link its per-parameter views of the flat partitions."""
    inner = deepspeed_engine.inner_optimizer(engine)
    flats = [p for group in inner.param_groups for p in group["params"]]
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        flats += list(getattr(engine.optimizer, attr, []) or [])
    for flat in flats:
        if not inner.state.get(flat):
            inner.state[flat] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 (done at the first step otherwise)
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def load_resharded(engine, checkpoint_dir: Path) -> None:
    """Load a checkpoint written at another world size into `engine` (every rank calls this)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    state, meta = consolidate_trainable_state(checkpoint_dir)
    _ensure_optimizer_state(engine)
    named = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    missing = sorted(set(named) - set(state))
    if missing:
        raise DSEEError(
            f"checkpoint '{checkpoint_dir}' lacks trainable tensors {missing[:3]}; it was written by another model"
        )
    for name, param in named.items():
        value = state[name]["fp32"]
        safe_set_full_fp32_param(param, value)
        for key in MOMENTS:
            safe_set_full_optimizer_state(param, state[name][key], key)
        # the working (low-precision) copy the forward pass uses
        with zero.gathered([param], modifier_rank=0):
            if not zero.is_partitioned(param) or torch.distributed.get_rank() == 0:
                param.data.copy_(value.to(param.dtype))
    for group_state in deepspeed_engine.inner_optimizer(engine).state.values():
        if "step" in group_state:
            group_state["step"] = (
                torch.tensor(float(meta["step"])) if torch.is_tensor(group_state["step"]) else meta["step"]
            )
    if engine.lr_scheduler is not None and meta["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        # a scheduler's state does not include the optimizer's current learning rate: put it back
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
