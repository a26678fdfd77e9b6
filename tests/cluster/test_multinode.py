"""Multi-node launches on a real two-node cluster (network namespaces + Slurm): the same program and
configs as on one node, the same losses."""

import os
import subprocess
import sys

import pytest

from dsee_dist.distributed import free_port
from tests.cluster.harness import NODES
from tests.conftest import REPO
from tests.distributed.launch import TINY_RUN, run_training, train_losses

pytestmark = pytest.mark.cluster

ZERO3_RUN = [*TINY_RUN, "deepspeed.config=configs/ds/zero3_fp32.json", "eval.every_n_steps=0"]
MASTER = NODES["node1"]


def node_env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, MASTER_ADDR=MASTER, PYTHONPATH=str(REPO), **extra)
    env.pop("SLURM_CONF", None)
    return env


@pytest.fixture(scope="module")
def one_node_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_node") / "run"
    run_training(2, out, *ZERO3_RUN)
    return train_losses(out)


def test_deepspeed_no_ssh_two_nodes_equals_one_node(cluster, tmp_path, one_node_reference):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    out = tmp_path / "run"
    port = str(free_port())
    procs = [cluster.popen_on(node, ["launch/deepspeed_multinode.sh", "--no-ssh", str(hostfile), "configs/quickstart.yaml",
                                     f"output.dir={out}", *ZERO3_RUN],
                              node_env(NODE_RANK=str(i), MASTER_PORT=port), tmp_path / f"{node}.log")
             for i, node in enumerate(NODES)]
    codes = [p.wait(timeout=300) for p in procs]
    logs = {node: (tmp_path / f"{node}.log").read_text() for node in NODES}
    assert codes == [0, 0], logs["node1"][-3000:] + logs["node2"][-3000:]
    assert "world size 2" in logs["node1"]
    losses = train_losses(out)
    assert len(losses) == len(one_node_reference) == 6
    assert losses == pytest.approx(one_node_reference, abs=1e-5)
