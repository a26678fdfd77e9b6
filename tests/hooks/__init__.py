"""Fault injection for tests that start real training processes.

`hook_env(...)` returns environment variables for such a process: `tests/hooks` goes first on PYTHONPATH,
so every Python process started with them (each rank, under any launcher) imports `sitecustomize.py` from
here, which patches the product's functions as they are imported. The product itself reads none of these
variables.
"""

from __future__ import annotations

import os
from pathlib import Path

HOOKS_DIR = Path(__file__).resolve().parent
REPO = HOOKS_DIR.parent.parent
STEP_DELAY = "DSEE_TEST_STEP_DELAY_S"
KILL_IN_SAVE = "DSEE_TEST_KILL_IN_SAVE"


def hook_env(
    *, step_delay_s: float | None = None, kill_in_save: tuple[int, int] | None = None, base: dict | None = None
) -> dict:
    """Variables to add to a training process's environment.

    step_delay_s: sleep this long after every optimizer step (so a test can signal a job mid-run).
    kill_in_save: (rank, step): that rank kills itself with SIGKILL after writing its shards of that step's
        checkpoint, before the save is committed (what a node failure mid-save looks like)."""
    source = os.environ if base is None else base
    path = [str(HOOKS_DIR), str(REPO)] + ([source["PYTHONPATH"]] if source.get("PYTHONPATH") else [])
    env = {"PYTHONPATH": os.pathsep.join(path)}
    if step_delay_s is not None:
        env[STEP_DELAY] = str(step_delay_s)
    if kill_in_save is not None:
        env[KILL_IN_SAVE] = f"{kill_in_save[0]}:{kill_in_save[1]}"
    return env
