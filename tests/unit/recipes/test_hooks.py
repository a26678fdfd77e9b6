"""The test-only plugin (tests/hooks) patches the product in processes started with its environment, and
only there."""

import subprocess
import sys

from tests.conftest import REPO
from tests.hooks import hook_env

PROBE = (
    "import dsee_dist.recipes.finetune as f, dsee_dist.engine.checkpoint as c; "
    "print(hasattr(f.train_step, '__wrapped__'), hasattr(c.write_rank_shards, '__wrapped__'))"
)


def _probe(env: dict) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=True
    )
    return proc.stdout.split()


def test_hook_environment_patches_the_step_and_the_save():
    import os

    env = dict(os.environ, **hook_env(step_delay_s=0.1, kill_in_save=(1, 8)))
    assert _probe(env) == ["True", "True"]
    plain = {k: v for k, v in os.environ.items() if not k.startswith("DSEE_TEST_")}
    assert _probe(plain) == ["False", "False"]
