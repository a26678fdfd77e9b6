"""The process group: joining it under any launcher, and the collectives the rest of the package uses.

`init_distributed()` works under `deepspeed`, `torchrun`, `mpirun`, `srun` and plain `python` (world size 1).
Every collective is a no-op in a world of one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsee_dist.engine.shm import unlink_cpu_shm_segments
from dsee_dist.errors import DSEEError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


LOST_PEER_EXIT_CODE = 3
_LOST_PEER_MARKERS = (
    "Timed out",
    "timed out",
    "Connection closed by peer",
    "Connection reset by peer",
    "connectFullMesh",
    "Broken pipe",
    "NCCL communicator was aborted",
    "Socket Timeout",
    "Application timeout caused pair closure",  # gloo, when the peer vanished mid-collective (seen in ZeRO-3's step)
)


def is_lost_peer(exc: BaseException) -> bool:
    """Whether an exception from a collective means another rank or node went away (or the network)."""
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _LOST_PEER_MARKERS)


def init_distributed(timeout_s: float = 1800) -> DistInfo:
    """Join (or, alone, create) the process group. Backend: NCCL on CUDA, gloo on CPU. A collective that
    waits longer than `timeout_s` for another rank fails (instead of hanging when a node is lost).

    Ranks started directly by Slurm (`srun python -m dsee_dist.train`, one task per rank) take RANK,
    WORLD_SIZE and LOCAL_RANK from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if (
        "RANK" not in os.environ
        and "SLURM_PROCID" in os.environ
        and "SLURM_STEP_ID" in os.environ
        and int(os.environ.get("SLURM_NTASKS", "1")) > 1
        and "OMPI_COMM_WORLD_RANK" not in os.environ
    ):
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
        os.environ.setdefault("MASTER_PORT", "29500")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ and "PMI_RANK" not in os.environ:
        # Plain `python -m dsee_dist.train`: a world of one.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        alone = "MASTER_PORT" not in os.environ
    else:
        alone = False
    if not dist.is_initialized():
        backend = get_accelerator().communication_backend_name()
        if backend == "ccl":  # the CPU accelerator's default needs oneCCL; gloo ships with torch
            backend = "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if alone:
            # The kernel picks the store's port as it listens: no window in which another process can take a
            # port chosen beforehand (EADDRINUSE). MASTER_PORT then names this job (shared-memory segments).
            store = dist.TCPStore(os.environ["MASTER_ADDR"], 0, 1, is_master=True, timeout=timeout)
            os.environ["MASTER_PORT"] = str(store.port)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if get_accelerator().device_name() == "cuda":
        check_rank_has_gpu(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
    else:
        barrier()  # every rank has mapped DeepSpeed's CPU allreduce segments
        unlink_cpu_shm_segments(local_rank)
        share_cpu_cores(local_ranks())
    return DistInfo(rank, world_size, local_rank)


def check_rank_has_gpu(local_rank: int, gpus: int) -> None:
    """One clear line instead of CUDA's "device_id cuda:N is out of range" when a node got more ranks than GPUs."""
    if local_rank >= gpus:
        raise DSEEError(
            f"local rank {local_rank} has no GPU: this node has {gpus} GPU(s) but {local_ranks()} ranks were started "
            f"on it; launch at most {gpus} per node (deepspeed --num_gpus {gpus}, torchrun --nproc-per-node {gpus}, "
            f"srun --ntasks-per-node {gpus})"
        )


def local_ranks() -> int:
    """How many ranks of this job run on this node, from whichever launcher started it (1 if none says)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(key, "").isdigit():
            return max(1, int(os.environ[key]))
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    return max(1, int(tasks)) if tasks.isdigit() else 1


def share_cpu_cores(ranks_on_node: int) -> int:
    """CPU training: give each of the node's ranks its share of the cores (as torchrun does), unless the user
    set OMP_NUM_THREADS. Without it every rank starts one thread per core, and N ranks on N cores spend their
    time waiting for each other's threads (small matrix operations become ~100x slower). Returns the count."""
    if "OMP_NUM_THREADS" in os.environ or ranks_on_node <= 1:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // ranks_on_node)
    torch.set_num_threads(threads)
    return threads


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if _world() > 1:
        dist.barrier()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(f"{name}:{torch.cuda.current_device()}" if name == "cuda" else name)


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if _world() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of an integer or float tensor; returned on the CPU."""
    if _world() == 1:
        return t
    on_device = t.to(device())
    dist.all_reduce(on_device)
    return on_device.cpu()


def broadcast_object(obj, src: int = 0):
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if _world() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_share(items: list, rank: int, world_size: int, *, lockstep: bool = False) -> list[tuple[object, bool]]:
    """This rank's round-robin share of `items` (`items[rank::world_size]`), each paired with True. With
    `lockstep` (every forward is collective, as under ZeRO-3, where a layer's weights are gathered from all
    ranks), a rank with fewer items than the busiest rank repeats the last item, paired with False (run it,
    drop its result), so that every rank runs the same number of rounds."""
    mine = [(item, True) for item in items[rank::world_size]]
    if lockstep and items:
        rounds = -(-len(items) // world_size)
        mine += [(items[-1], False)] * (rounds - len(mine))
    return mine


def on_rank_zero(fn):
    """Run `fn` on rank 0 only and share its result, or its failure, with every rank, so that no
    rank waits at a barrier for a rank that failed. Results must be picklable."""
    if _world() == 1:
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


def on_local_rank_zero(fn) -> None:
    """Run `fn` once per node (on its local rank 0) while the node's other ranks wait; a failure on any node is
    raised on every rank, so that no rank waits for a rank that failed. For work whose result is on disk (the
    tokenised data cache), written where every rank of the node reads it."""
    if _world() == 1:
        fn()
        return
    error = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            fn()
        except DSEEError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported on every rank as one line
            error = f"rank {dist.get_rank()} failed: {type(exc).__name__}: {exc}"
    errors = [e for e in all_gather_object(error) if e]
    if errors:
        raise DSEEError(errors[0])
