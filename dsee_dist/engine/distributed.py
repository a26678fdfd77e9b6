"""Everything distributed, behind a small interface. The only module that imports deepspeed.

- `init_distributed()` works under `deepspeed`, `torchrun` and plain `python` (world size 1).
- `build_deepspeed_config()` merges the engine JSON with the settings owned by the experiment
  config (batch sizes, clipping) and refuses conflicts.
- `gathered()` wraps `deepspeed.zero.GatheredParameters`: a no-op unless parameters are ZeRO-3
  partitioned; pass `modifier_rank` for in-place edits.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dsee_dist.config import global_batch_size, merge_nested
from dsee_dist.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOST_PEER_EXIT_CODE = 3
_LOST_PEER_MARKERS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                      "connectFullMesh", "Broken pipe", "NCCL communicator was aborted", "Socket Timeout")


def is_lost_peer(exc: BaseException) -> bool:
    """Whether an exception from a collective means another rank or node went away (or the network)."""
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _LOST_PEER_MARKERS)


def init_distributed(timeout_s: float = 1800) -> DistInfo:
    """Join (or, alone, create) the process group. Backend: NCCL on CUDA, gloo on CPU. A collective that
    waits longer than `timeout_s` for another rank fails (instead of hanging when a node is lost).

    Ranks started directly by Slurm (`srun python -m dsee_dist.train`, one task per rank) take RANK,
    WORLD_SIZE and LOCAL_RANK from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ \
            and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_PORT", "29500")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ and "PMI_RANK" not in os.environ:
        # Plain `python -m dsee_dist.train`: a world of one.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = get_accelerator().communication_backend_name()
        if backend == "ccl":  # the CPU accelerator's default needs oneCCL; gloo ships with torch
            backend = "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    else:
        _unlink_cpu_shm_segments(local_rank)
    return DistInfo(rank, world_size, local_rank)


def _unlink_cpu_shm_segments(local_rank: int) -> None:
    """DeepSpeed's CPU allreduce maps one 66 MB /dev/shm segment per rank and never unlinks it, so every
    job leaks them (RAM-backed) until the machine runs out of memory. Once every rank has mapped them
    (after the barrier), the names can go: the mappings stay valid until the processes exit, so nothing
    is left behind even after a kill -9."""
    barrier()
    if local_rank != 0:
        return
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_"
    shm = Path("/dev/shm")
    if shm.is_dir():
        for segment in shm.glob(prefix + "*"):
            segment.unlink(missing_ok=True)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(f"{name}:{torch.cuda.current_device()}" if name == "cuda" else name)


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of an integer or float tensor; returned on the CPU."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    on_device = t.to(device())
    dist.all_reduce(on_device)
    return on_device.cpu()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_rank_zero(fn):
    """Run `fn` on rank 0 only and share its result, or its failure, with every rank, so that no
    rank waits at a barrier for a rank that failed. Results must be picklable."""
    from dsee_dist.errors import DSEEError

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except DSEEError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported on every rank as one line
            error = f"rank 0 failed: {type(exc).__name__}: {exc}"
    result, error = broadcast_object((result, error))
    if error:
        raise DSEEError(error)
    return result


# ------------------------------------------------------------------------------ ZeRO helpers


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None):
    """Full tensors inside the block (ZeRO-3), else a no-op. With `modifier_rank`, that rank's edits
    are re-partitioned on exit."""
    params = [p for p in params if p is not None]
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def full_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """A full CPU copy of one parameter on every rank (gathers one tensor under ZeRO-3)."""
    with gathered([param]):
        return param.detach().to("cpu", copy=True)


# ------------------------------------------------------------------------------ DeepSpeed config


def resolve_deepspeed_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON (line {exc.lineno}): {exc.msg}") from None


OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
}


def build_deepspeed_config(engine_json: dict, overrides: dict, *, micro_batch_size: int, grad_accum_steps: int,
                           grad_clip: float, world_size: int) -> dict:
    """Engine JSON + overrides + the experiment-owned settings; a conflicting value is an error."""
    ds = merge_nested(engine_json, overrides)
    owned = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
    }
    for key, value in owned.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ConfigError(f"DeepSpeed config sets {key}={ds[key]} but it is owned by {OWNED_KEYS[key]}={value}; "
                              f"remove it from the JSON")
        ds[key] = value
    global_batch = global_batch_size(micro_batch_size, grad_accum_steps, world_size)
    if ds.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ConfigError(f"DeepSpeed config sets train_batch_size={ds['train_batch_size']} but "
                          f"micro_batch_size x grad_accum_steps x world_size = {global_batch}; remove it from the JSON")
    ds["train_batch_size"] = global_batch
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError("DeepSpeed config must not define 'optimizer' or 'scheduler': dsee_dist builds them from train.*")
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None):
        # The optimizer is built in code (torch AdamW, or DeepSpeedCPUAdam when offloading).
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_engine(model, optimizer, lr_scheduler, ds_config: dict):
    import deepspeed

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config,
        model_parameters=None,
    )
    _exclude_tied_frozen_weights_from_checkpoints(engine)
    return engine, optimizer, lr_scheduler


def _exclude_tied_frozen_weights_from_checkpoints(engine) -> None:
    """`save_checkpoint(exclude_frozen_parameters=True)` drops frozen tensors found by `named_parameters()`,
    which skips tied duplicates: GPT-2's lm_head.weight (tied to the frozen embedding) would be written
    into every adapter-sized checkpoint (51 M values for GPT-2). Drop frozen tensors under all their names."""
    original = engine.module_state_dict

    def module_state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        state = original(destination=destination, prefix=prefix, keep_vars=keep_vars,
                          exclude_frozen_parameters=exclude_frozen_parameters)
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(prefix + name, None)
        return state

    engine.module_state_dict = module_state_dict


def inner_optimizer(engine):
    """The torch optimizer inside DeepSpeed's ZeRO wrappers (its state is keyed by the flat fp32 partitions)."""
    opt = engine.optimizer
    while getattr(opt, "optimizer", None) is not None and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


def optimizer_state_numel(engine) -> int:
    """Values in this rank's Adam first-moment state: shows what the optimizer really holds (only
    the adapters, and under ZeRO >= 1 only this rank's partition of them)."""
    return sum(state["exp_avg"].numel() for state in inner_optimizer(engine).state.values() if "exp_avg" in state)


def build_optimizer(param_groups, ds_config: dict, lr: float, betas, weight_decay: float):
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu" and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
