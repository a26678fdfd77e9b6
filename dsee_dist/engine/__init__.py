"""The DeepSpeed runtime, behind a small interface. The only package that imports deepspeed.

- `process_group.py`: joining the process group under any launcher; the collectives (`barrier`,
  `all_reduce_sum`, `on_rank_zero`, ...); a rank's share of the work in lockstep (`rank_share`);
  lost-peer detection.
- `deepspeed_engine.py`: the DeepSpeed config (engine JSON + the experiment-owned settings), the
  optimizer and `build_engine`; the gradient norm where DeepSpeed keeps none (`trainable_grad_norm`).
- `zero.py`: ZeRO-3 parameter helpers (`gathered`, `full_tensor`, `is_partitioned`, `partitioned_init`).
- `shm.py`: shared-memory housekeeping for DeepSpeed's CPU allreduce.
- `launcher.py`: the `deepspeed` launcher command lines and their environment (no deepspeed import).
- `memory.py`: the memory a run holds per rank under each ZeRO stage, behind `dsee-dist plan` (no deepspeed
  import: DeepSpeed's partitioning, buckets and offload as arithmetic over the DeepSpeed JSON).
- `checkpoint.py`, `reshard.py`, `preemption.py`: sharded checkpoints, resuming at another world size or
  ZeRO stage, and stopping on a signal with a checkpoint (import them by name).
- `process_exit.py`: how a command's process ends: one error line instead of a traceback
  (`reports_errors`), an exit without interpreter teardown (`exit_process`).

`from dsee_dist import engine` gives the names below; the modules above give them by their own module
(`from dsee_dist.engine import process_group; process_group.barrier()`).
"""

from dsee_dist.engine.deepspeed_engine import (
    OWNED_KEYS,
    build_deepspeed_config,
    build_engine,
    build_optimizer,
    deepspeed_config_of,
    inner_optimizer,
    optimizer_state_numel,
    reports_grad_norm,
    resolve_deepspeed_json,
    trainable_grad_norm,
    zero_stage,
)
from dsee_dist.engine.launcher import deepspeed_command, free_port, launch_env, training_command
from dsee_dist.engine.process_group import (
    LOST_PEER_EXIT_CODE,
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    all_reduce_tensor,
    barrier,
    broadcast_object,
    device,
    init_distributed,
    is_lost_peer,
    on_local_rank_zero,
    on_rank_zero,
    rank_share,
    shutdown,
)
from dsee_dist.engine.zero import full_tensor, gathered, is_partitioned, partitioned_init

__all__ = [
    "LOST_PEER_EXIT_CODE",
    "OWNED_KEYS",
    "DistInfo",
    "all_gather_object",
    "all_reduce_sum",
    "all_reduce_tensor",
    "barrier",
    "broadcast_object",
    "build_deepspeed_config",
    "build_engine",
    "build_optimizer",
    "deepspeed_command",
    "deepspeed_config_of",
    "device",
    "free_port",
    "full_tensor",
    "gathered",
    "inner_optimizer",
    "init_distributed",
    "is_lost_peer",
    "is_partitioned",
    "launch_env",
    "on_local_rank_zero",
    "on_rank_zero",
    "optimizer_state_numel",
    "partitioned_init",
    "rank_share",
    "reports_grad_norm",
    "resolve_deepspeed_json",
    "shutdown",
    "trainable_grad_norm",
    "training_command",
    "zero_stage",
]
