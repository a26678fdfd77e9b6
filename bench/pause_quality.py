"""Run a command while a running quality table (bench/quality.py) is stopped, so that both get the machine's
cores to themselves (on a 2-core CPU a second job slows the table's training ~3x and spoils its timings).

    python bench/pause_quality.py -- bash .ci/run

Every bench/quality.py process and its trainer get SIGSTOP, the command runs, they get SIGCONT; the seconds
stopped are added to the trainer's run directory (quality.PAUSED_FILE), which bench/quality.py subtracts from
that row's wall time. Exits with the command's status.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.quality import PAUSED_FILE, paused_seconds, results_dir_of  # noqa: E402


def table_processes(script: Path | None = None) -> tuple[list[psutil.Process], list[Path]]:
    """The running bench/quality.py processes (only those run from `script`, if given), their trainers, and
    the directories whose PAUSED_FILE counts the pause: the trainers' run directories and the tables' results."""
    me = psutil.Process()
    mine = {me.pid} | {p.pid for p in me.parents()}  # called before the command starts: it has no children yet
    procs, run_dirs = [], []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        # `python bench/quality.py ...` itself (not this command's own line, its wrappers or what it runs)
        if p.pid in mine or len(cmd) < 2 or not cmd[1].endswith("bench/quality.py"):
            continue
        if script is None or Path(cmd[1]).resolve() == script.resolve():
            procs.append(p)
            for child in p.children(recursive=True):
                procs.append(child)
                child_cmd = child.cmdline()
                if "--config" in child_cmd:
                    run_dirs.append(Path(child_cmd[child_cmd.index("--config") + 1]).parent)
            run_dirs.append(Path(p.cwd()) / results_dir_of(cmd[2:]))  # the table's own pauses (decoding)
    return procs, run_dirs


def main(argv: list[str]) -> int:
    script = None
    if argv[:1] == ["--script"] and len(argv) > 1:  # only the table run from this script (the tests' own)
        script, argv = Path(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python bench/pause_quality.py [--script PATH] -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    procs, run_dirs = table_processes(script)
    if not procs:
        print("pause_quality: no bench/quality.py is running; running the command anyway", flush=True)
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    start = time.time()
    try:
        return subprocess.call(argv)
    finally:
        stopped = time.time() - start
        for run_dir in run_dirs:
            if run_dir.is_dir():
                (run_dir / PAUSED_FILE).write_text(f"{paused_seconds(run_dir) + stopped:.1f}\n")
        for p in procs:
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        print(f"pause_quality: the table was stopped for {stopped:.0f} s; resumed", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
