"""Test-only plugin, imported at start-up by every Python process that has tests/hooks on PYTHONPATH (see
tests/hooks/__init__.py). Patches product functions right after their module is first imported:

- DSEE_TEST_STEP_DELAY_S=SECONDS: `recipes.finetune.train_step` sleeps that long after every step.
- DSEE_TEST_KILL_IN_SAVE=RANK:STEP: after `engine.checkpoint.write_rank_shards` of that step, that rank
  kills itself with SIGKILL (before the barrier that commits the checkpoint).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time


def _patch_step_delay(module) -> None:
    delay = float(os.environ["DSEE_TEST_STEP_DELAY_S"])
    original = module.train_step

    @functools.wraps(original)
    def train_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        time.sleep(delay)
        return loss

    module.train_step = train_step


def _patch_kill_in_save(module) -> None:
    rank, step = (int(x) for x in os.environ["DSEE_TEST_KILL_IN_SAVE"].split(":"))
    original = module.write_rank_shards

    @functools.wraps(original)
    def write_rank_shards(engine, partial_dir, save_step, dist_info):
        original(engine, partial_dir, save_step, dist_info)
        if dist_info.rank == rank and save_step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    module.write_rank_shards = write_rank_shards


PATCHES = {}
if os.environ.get("DSEE_TEST_STEP_DELAY_S"):
    PATCHES["dsee_dist.recipes.finetune"] = _patch_step_delay
if os.environ.get("DSEE_TEST_KILL_IN_SAVE"):
    PATCHES["dsee_dist.engine.checkpoint"] = _patch_kill_in_save


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the patched modules with the normal path finder and runs the patch after the module executes."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, PATCHES[name]
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        loader.exec_module = exec_and_patch
        return spec


if PATCHES:
    sys.meta_path.insert(0, _PatchAfterImport())
