"""How many ranks share this node, each rank's share of the CPU cores, and each rank's share of a list of
work items (in lockstep or not)."""

import os

import pytest
import torch

from dsee_dist.engine import process_group
from dsee_dist.errors import DSEEError

LAUNCHER_VARS = (
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_NTASKS_PER_NODE",
)


@pytest.fixture
def clean_env(monkeypatch):
    for key in (*LAUNCHER_VARS, "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("LOCAL_WORLD_SIZE", "4", 4),  # torchrun
        ("LOCAL_SIZE", "2", 2),  # deepspeed
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "3", 3),  # Open MPI's mpirun
        ("SLURM_NTASKS_PER_NODE", "8(x2)", 8),  # srun
    ],
)
def test_local_ranks_from_each_launcher(clean_env, key, value, expected):
    assert process_group.local_ranks() == 1
    clean_env.setenv(key, value)
    assert process_group.local_ranks() == expected


def test_ranks_share_the_cores_unless_the_user_chose(clean_env):
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    assert process_group.share_cpu_cores(1) == cores  # alone: every core
    assert process_group.share_cpu_cores(2) == max(1, cores // 2) == torch.get_num_threads()
    assert process_group.share_cpu_cores(4 * cores) == 1 == torch.get_num_threads()
    torch.set_num_threads(cores)
    clean_env.setenv("OMP_NUM_THREADS", str(cores))
    assert process_group.share_cpu_cores(2) == cores == torch.get_num_threads()


def test_a_rank_without_a_gpu_is_refused_in_one_line(clean_env):
    process_group.check_rank_has_gpu(0, 1)
    clean_env.setenv("LOCAL_SIZE", "2")
    with pytest.raises(DSEEError) as err:
        process_group.check_rank_has_gpu(1, 1)
    message = str(err.value)
    assert "\n" not in message and "this node has 1 GPU(s) but 2 ranks" in message and "--num_gpus 1" in message


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 6])
def test_rank_shares_cover_the_items_once_and_keep_lockstep(world_size, n):
    items = [f"batch{i}" for i in range(n)]
    free = [process_group.rank_share(items, r, world_size) for r in range(world_size)]
    locked = [process_group.rank_share(items, r, world_size, lockstep=True) for r in range(world_size)]
    # counted items: every item exactly once, in either mode
    for shares in (free, locked):
        counted = sorted(item for share in shares for item, counts in share if counts)
        assert counted == sorted(items)
    # without lockstep nothing is repeated; with it every rank runs as many rounds as the busiest
    assert all(counts for share in free for _, counts in share)
    assert {len(share) for share in locked} == {-(-n // world_size)}
    # a rank that keeps pace runs a real item (same shapes), after its own ones
    for share in locked:
        flags = [counts for _, counts in share]
        assert flags == sorted(flags, reverse=True)
        assert all(item in items for item, _ in share)


def test_a_world_of_one_listens_on_the_port_it_names(tmp_path):
    """Plain `python -m dsee_dist.train`: the store's port is picked by the kernel as it listens (a port chosen
    beforehand can be taken in between: EADDRINUSE, here forced by offering a taken one), and MASTER_PORT names
    the port listened on."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = (
        "import os, socket, torch, torch.distributed as dist\n"
        "from dsee_dist.engine import launcher, process_group\n"
        "taken = socket.socket(socket.AF_INET6); taken.bind(('::', 0)); taken.listen()\n"
        "launcher.free_port = process_group.free_port = lambda: taken.getsockname()[1]  # a port already taken\n"
        "info = process_group.init_distributed()\n"
        "t = torch.ones(1); dist.all_reduce(t)\n"
        "s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
        "try:\n"
        "    s.bind(('::', int(os.environ['MASTER_PORT']))); print('FREE')\n"
        "except OSError:\n"
        "    print('BUSY', info.rank, info.world_size, t.item())\n"
        "from dsee_dist.engine.process_exit import exit_process\n"
        "process_group.shutdown(); exit_process(0)  # as the trainer's ranks end (no teardown after gloo)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-4:] == ["BUSY", "0", "1", "1.0"]
