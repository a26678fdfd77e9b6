"""The bench workers end the way the trainer's ranks end (bench/_common.end_rank: process group destroyed, then
dsee_dist's exit_process): gloo's threads can otherwise abort a finished rank at interpreter exit ("terminate
called without an active exception", status 250), and the benchmark then reports finished work as failed."""

import os
import subprocess
import sys

from dsee_dist.engine.launcher import free_port, launch_env
from tests.conftest import REPO

LAUNCHES, RANKS = 5, 2


def launch(out) -> list[subprocess.Popen]:
    """The ranks of one 2-rank job on this host, started with the variables the deepspeed launcher sets (its own
    process adds seconds of imports per launch and nothing to how a rank ends)."""
    port = str(free_port())
    procs = []
    for rank in range(RANKS):
        env = launch_env(
            dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(RANKS),
                LOCAL_WORLD_SIZE=str(RANKS),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                OMP_NUM_THREADS="1",
            )
        )
        cmd = [sys.executable, str(REPO / "tests" / "bench" / "exit_worker.py"), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def test_a_two_rank_gloo_worker_exits_cleanly_every_time(tmp_path):
    for i in range(LAUNCHES):
        out = tmp_path / str(i)
        out.mkdir()
        for rank, proc in enumerate(launch(out)):
            output = proc.communicate(timeout=120)[0].decode(errors="replace")
            assert proc.returncode == 0, f"launch {i} rank {rank}:\n{output[-3000:]}"
            assert "terminate called" not in output, f"launch {i} rank {rank}:\n{output[-3000:]}"
        assert [(out / f"rank{r}").read_text() for r in range(RANKS)] == ["3\n", "3\n"]  # the collective ran
        assert not list(out.glob("teardown*"))  # ended by exit_process, before any interpreter teardown
