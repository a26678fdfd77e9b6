"""Logging for every rank: `[dsee rank0] message` on stdout. Progress and info come from rank 0 only (every
rank says the same); warnings and errors from every rank.

Modules log through `logging.getLogger(__name__)`; entry points call `setup_logging()` once, and again with
the real rank after the process group is up.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGER = "dsee_dist"


class RankFormatter(logging.Formatter):
    """`[dsee rank3] message`."""

    def __init__(self, rank: int):
        super().__init__(f"[dsee rank{rank}] %(message)s")


class RankZeroInfoFilter(logging.Filter):
    """On ranks other than 0, drop records below WARNING."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def env_rank() -> int:
    """The rank the launcher gave this process (0 when started alone)."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> logging.Logger:
    """Route the package's loggers to one stdout handler with the rank-aware format (idempotent)."""
    rank = env_rank() if rank is None else rank
    root = logging.getLogger(ROOT_LOGGER)
    for handler in [h for h in root.handlers if getattr(h, "_dsee_handler", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler._dsee_handler = True
    handler.setFormatter(RankFormatter(rank))
    handler.addFilter(RankZeroInfoFilter(rank))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return root
