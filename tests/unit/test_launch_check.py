"""Launch preflight: bad hostfiles, node counts and rendezvous settings fail with one clear line."""

import os
import subprocess
import sys

import pytest

from dsee_dist.errors import DSEEError
from dsee_dist.launch_check import check_allocation, check_rendezvous, parse_hostfile
from tests.conftest import REPO


def test_shipped_example_parses():
    assert parse_hostfile(REPO / "hostfile.example") == {"node001": 8, "node002": 8}


@pytest.mark.parametrize(
    "text,message",
    [
        ("node1 slots=2\nnode2 gpus=2\n", ":2: 'node2 gpus=2' is not of the form 'hostname slots=N'"),
        ("node1 slots=0\n", ":1: slots must be a positive integer"),
        ("node1 slots=x\n", ":1: slots must be a positive integer"),
        ("node1 slots=2\nnode1 slots=2\n", ":2: host 'node1' is listed twice"),
        ("# only comments\n\n", "lists no hosts"),
    ],
)
def test_malformed_hostfiles_name_the_line(tmp_path, text, message):
    path = tmp_path / "hf"
    path.write_text(text)
    with pytest.raises(DSEEError, match=message.replace("'", ".").replace("(", r"\(")):
        parse_hostfile(path)


def test_comments_and_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "hf"
    path.write_text("# nodes\nnode1 slots=2   # first\n\n10.0.0.2 slots=4\n")
    assert parse_hostfile(path) == {"node1": 2, "10.0.0.2": 4}


def test_node_count_must_match_hostfile_and_allocation():
    with pytest.raises(DSEEError, match="--nnodes 3 does not match the 2 hosts"):
        check_allocation({"a": 1, "b": 1}, 3, {})
    with pytest.raises(DSEEError, match="the Slurm allocation has 4"):
        check_allocation({"a": 1, "b": 1}, None, {"SLURM_JOB_NUM_NODES": "4"})
    check_allocation({"a": 1, "b": 1}, 2, {"SLURM_JOB_NUM_NODES": "2"})


def test_master_addr_is_required_outside_slurm_only():
    with pytest.raises(DSEEError, match="MASTER_ADDR is not set"):
        check_rendezvous({}, multi_node=True)
    check_rendezvous({"SLURM_JOB_ID": "7"}, multi_node=True)
    check_rendezvous({}, multi_node=False)
    with pytest.raises(DSEEError, match="MASTER_PORT 'abc'"):
        check_rendezvous({"MASTER_ADDR": "n1", "MASTER_PORT": "abc"}, multi_node=True)


def test_cli_missing_hostfile_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dsee_dist.launch_check", "--hostfile", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


@pytest.mark.parametrize(
    "script,args,env,message",
    [
        (
            "launch/deepspeed_multinode.sh",
            ["--no-ssh", "{bad}", "configs/multinode/tiny_cpu.yaml"],
            {"MASTER_ADDR": "n1", "NODE_RANK": "0"},
            "is not of the form 'hostname slots=N'",
        ),
        ("launch/deepspeed_multinode.sh", ["{missing}", "configs/multinode/tiny_cpu.yaml"], {}, "does not exist"),
        (
            "launch/deepspeed_multinode.sh",
            ["--no-ssh", "{good}", "configs/multinode/tiny_cpu.yaml"],
            {"MASTER_ADDR": ""},
            "MASTER_ADDR is not set",
        ),
        (
            "launch/mpi/mpirun.sh",
            ["{bad}", "configs/multinode/tiny_cpu.yaml"],
            {},
            "is not of the form 'hostname slots=N'",
        ),
    ],
)
def test_launch_scripts_refuse_bad_input_before_any_rank_starts(tmp_path, script, args, env, message):
    (tmp_path / "bad").write_text("node1 slots=2\nnode2 slots two\n")
    (tmp_path / "good").write_text("node1 slots=1\nnode2 slots=1\n")
    paths = {"{bad}": str(tmp_path / "bad"), "{good}": str(tmp_path / "good"), "{missing}": str(tmp_path / "nope")}
    full_env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "SLURM_JOB_ID")}
    full_env.update(PYTHON=sys.executable, **{k: v for k, v in env.items() if v})
    proc = subprocess.run(
        ["bash", script, *[paths.get(a, a) for a in args]],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "deepspeed.launcher" not in proc.stdout + proc.stderr


def test_slurm_submit_refuses_a_bad_config_before_sbatch(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\n")  # must never be reached
    (tmp_path / "sbatch").chmod(0o755)
    proc = subprocess.run(
        ["bash", "launch/slurm/submit.sh", "2", "8", "configs/multinode/tiny_cpu.yaml", "train.lr=-1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["dsee_dist: error: train.lr must be > 0, got -1.0"], proc.stderr
    assert not (tmp_path / "submitted").exists()
