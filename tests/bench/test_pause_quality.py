"""bench/pause_quality.py stops a running quality table (and its trainer) while a command runs, resumes it,
and records the pause in the trainer's run directory; it never stops itself or the command it runs."""

import subprocess
import sys
import time

import psutil

from bench import pause_quality
from bench.quality import PAUSED_FILE

TABLE = """
import subprocess, sys, time
trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--config", sys.argv[1]])
time.sleep(60)
"""


def _state(pid: int) -> str:
    return psutil.Process(pid).status()


def test_the_table_is_stopped_during_the_command_and_resumed_after(tmp_path):
    script = tmp_path / "bench" / "quality.py"  # matched by its name, like the real one
    script.parent.mkdir()
    script.write_text(TABLE)
    run_dir = tmp_path / "rows" / "dsee-s42" / "run"
    run_dir.mkdir(parents=True)
    table = subprocess.Popen([sys.executable, str(script), str(run_dir / "config.yaml")])
    try:
        deadline = time.time() + 30
        while not psutil.Process(table.pid).children() and time.time() < deadline:
            time.sleep(0.05)
        (trainer,) = psutil.Process(table.pid).children()
        probe = tmp_path / "states.txt"
        check = f"import psutil; open({str(probe)!r}, 'w').write(psutil.Process({table.pid}).status() + ' ' + "
        check += f"psutil.Process({trainer.pid}).status())"
        # --script: only this fake table, never a real one running on the same machine
        command = ["--script", str(script), "--", sys.executable, "-c", f"import time; time.sleep(0.5); {check}"]
        assert pause_quality.main(command) == 0
        assert probe.read_text() == f"{psutil.STATUS_STOPPED} {psutil.STATUS_STOPPED}"  # both, during the command
        assert _state(table.pid) != psutil.STATUS_STOPPED and _state(trainer.pid) != psutil.STATUS_STOPPED
        assert 0.4 < float((run_dir / PAUSED_FILE).read_text()) < 30
        pause_quality.main(["--script", str(script), "--", sys.executable, "-c", "pass"])  # adds to the first
        assert float((run_dir / PAUSED_FILE).read_text()) >= 0.4
    finally:
        for p in psutil.Process(table.pid).children(recursive=True):
            p.kill()
        table.kill()
        table.wait()
