"""bench/pause_quality.py stops a running quality table (and its trainer) while a command runs, resumes it,
and records the pause in the trainer's run directory and the table's results directory; it never stops itself
or the command it runs."""

import subprocess
import sys
import time

import psutil

from bench import pause_quality
from bench.quality import PAUSED_FILE

TABLE = """
import os, subprocess, sys, time
config = os.path.abspath(sys.argv[sys.argv.index("--results") + 1] + "/rows/dsee-s42/run/config.yaml")
trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--config", config])
time.sleep(60)
"""


def _state(pid: int) -> str:
    return psutil.Process(pid).status()


def test_the_table_is_stopped_during_the_command_and_resumed_after(tmp_path):
    script = tmp_path / "bench" / "quality.py"  # matched by its name, like the real one
    script.parent.mkdir()
    script.write_text(TABLE)
    results = tmp_path / "results"
    run_dir = results / "rows" / "dsee-s42" / "run"
    run_dir.mkdir(parents=True)
    # a relative --results, as a user types it: taken from the table's working directory
    table = subprocess.Popen([sys.executable, str(script), "--model", "m", "--results", "results"], cwd=tmp_path)
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
        # the trainer's pause (its training time) and the table's (e.g. its decoding time) are both recorded
        for directory in (run_dir, results):
            assert 0.4 < float((directory / PAUSED_FILE).read_text()) < 30
        first = float((results / PAUSED_FILE).read_text())
        pause_quality.main(["--script", str(script), "--", sys.executable, "-c", "import time; time.sleep(0.2)"])
        assert float((results / PAUSED_FILE).read_text()) >= first + 0.2  # added to the first
    finally:
        for p in psutil.Process(table.pid).children(recursive=True):
            p.kill()
        table.kill()
        table.wait()
