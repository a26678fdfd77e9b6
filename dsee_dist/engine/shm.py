"""Shared-memory housekeeping for DeepSpeed's CPU allreduce."""

from __future__ import annotations

import os
from pathlib import Path


def unlink_cpu_shm_segments(local_rank: int) -> None:
    """DeepSpeed's CPU allreduce maps one 66 MB /dev/shm segment per rank and never unlinks it, so every
    job leaks them (RAM-backed) until the machine runs out of memory. Once every rank has mapped them
    (call after a barrier), the names can go: the mappings stay valid until the processes exit, so nothing
    is left behind even after a kill -9."""
    if local_rank != 0:
        return
    master = f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_{master}_"
    shm = Path("/dev/shm")
    if shm.is_dir():
        for segment in shm.glob(prefix + "*"):
            segment.unlink(missing_ok=True)
