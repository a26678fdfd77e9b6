"""`dsee-dist COMMAND ...`: the commands that parse their own arguments get them untouched, options first too
(argparse's REMAINDER refused `dsee-dist train --config X.yaml` and `dsee-dist plan --world-size 2 X.yaml`)."""

import json
import subprocess
import sys

from tests.conftest import REPO


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dsee_dist", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_train_takes_its_config_option(tmp_path):
    proc = _cli("train", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "unrecognized arguments" not in proc.stderr
    assert f"config file '{tmp_path / 'missing.yaml'}' does not exist" in proc.stderr


def test_train_usage_names_the_command_typed():
    proc = _cli("train")
    assert proc.returncode == 2 and "usage: dsee-dist train" in proc.stderr, proc.stderr


def test_plan_takes_options_before_the_config():
    proc = _cli("plan", "--world-size", "2", "--json", "configs/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["peak_bytes"] > 0


def test_export_takes_options_before_the_checkpoint(tmp_path):
    proc = _cli("export", "--merged", str(tmp_path / "merged"), str(tmp_path / "nope"))
    assert proc.returncode == 2 and f"checkpoint '{tmp_path / 'nope'}' does not exist" in proc.stderr
