"""`dsee-dist export` refuses bad input with one line and exit 2, writing nothing."""

import subprocess
import sys

from tests.conftest import REPO


def _export(*args):
    return subprocess.run(
        [sys.executable, "-m", "dsee_dist", "export", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_missing_checkpoint_is_named(tmp_path):
    proc = _export(str(tmp_path / "nope"), "--merged", str(tmp_path / "merged"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "merged").exists()


def test_incomplete_checkpoint_is_refused(tmp_path):
    partial = tmp_path / "checkpoints" / "step_00000004"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    proc = _export(str(partial), "--adapter", str(tmp_path / "adapter"))
    assert proc.returncode == 2 and "is incomplete" in proc.stderr
    assert not (tmp_path / "adapter").exists()


def test_nothing_to_do_is_an_error(tmp_path):
    proc = _export(str(tmp_path))
    assert proc.returncode == 2 and "give --adapter DIR and/or --merged DIR" in proc.stderr
