"""Multi-node launches on a real two-node cluster (network namespaces + Slurm): the same program and
configs as on one node, the same losses."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from dsee_dist.engine.launcher import free_port
from tests.cluster.harness import NODES
from tests.conftest import REPO
from tests.distributed.launch import run_training, train_losses
from tests.hooks import hook_env

pytestmark = pytest.mark.cluster

CONFIG = "configs/multinode/tiny_cpu.yaml"  # built-in gpt2-tiny, ZeRO-3 fp32, 6 steps
MASTER = NODES["node1"]


def node_env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, MASTER_ADDR=MASTER, PYTHONPATH=str(REPO))
    env.update(extra)
    env.pop("SLURM_CONF", None)
    return env


@pytest.fixture(scope="module")
def one_node_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_node") / "run"
    run_training(2, out, config=CONFIG)
    return train_losses(out)


def test_deepspeed_no_ssh_two_nodes_equals_one_node(cluster, tmp_path, one_node_reference):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    out = tmp_path / "run"
    port = str(free_port())
    procs = [
        cluster.popen_on(
            node,
            ["launch/deepspeed_multinode.sh", "--no-ssh", str(hostfile), CONFIG, f"output.dir={out}"],
            node_env(NODE_RANK=str(i), MASTER_PORT=port),
            tmp_path / f"{node}.log",
        )
        for i, node in enumerate(NODES)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    logs = {node: (tmp_path / f"{node}.log").read_text() for node in NODES}
    assert codes == [0, 0], logs["node1"][-3000:] + logs["node2"][-3000:]
    assert "world size 2" in logs["node1"]
    losses = train_losses(out)
    assert len(losses) == len(one_node_reference) == 6
    assert losses == pytest.approx(one_node_reference, abs=1e-5)


def submit(cluster, tmp_path, out, *overrides, env_extra=None, sbatch_args=()):
    env = node_env(**(env_extra or {}))
    log = tmp_path / "slurm-%j.out"
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            f"--output={log}",
            f"--chdir={REPO}",
            *sbatch_args,
            "launch/slurm/dsee.sbatch",
            CONFIG,
            f"output.dir={out}",
            *overrides,
        ],
        env={**env, "SLURM_CONF": str(cluster.conf)},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    job = proc.stdout.strip().split(";")[0]
    return job, tmp_path / f"slurm-{job}.out"


def job_files_left(out):
    """What dsee.sbatch keeps while a job runs (hostfile, exit status), left in the output directory or,
    as it once did, in the submit directory (the repository)."""
    return sorted(str(p) for p in [*out.glob(".dsee-slurm-*"), *REPO.glob(".dsee-hostfile-*")])


def test_sbatch_script_runs_two_nodes_to_completion(cluster, tmp_path, one_node_reference):
    out = tmp_path / "run"
    job, log = submit(cluster, tmp_path, out)
    state = cluster.wait_job(job, 300)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "2 nodes x 1 ranks, master node1" in text
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert train_losses(out) == pytest.approx(one_node_reference, abs=1e-5)
    assert job_files_left(out) == []


def _wait_for_steps(out, n, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if len(train_losses(out)) >= n:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{out}: fewer than {n} steps after {timeout}s")


def preempted_step(text: str) -> int:
    """The step whose checkpoint the preempted ranks saved (3 unless the machine is very slow)."""
    found = re.findall(r"preempted \([^)]*\): checkpoint of step (\d+) saved", text)
    assert len(found) == 1, text[-4000:]
    return int(found[0])


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_losses(cluster, tmp_path, one_node_reference):
    out = tmp_path / "run"
    job, log = submit(cluster, tmp_path, out, env_extra=hook_env(step_delay_s=1.5))
    _wait_for_steps(out, 2)
    cluster.slurm("scancel", "--signal=USR1", job)  # what Slurm sends before a time limit or preemption
    # Slurm holds a requeued job back for its credential lifetime (BeginTime, 121 s by default). To keep the
    # test short it is started at once, but only after its first run has fully left the nodes: earlier,
    # the nodes refuse the launch ("Job N already killed") and the job ends FAILED (wait_requeued explains).
    cluster.wait_requeued(job, restarts=1, timeout=120)
    cluster.slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = cluster.wait_job(job, 300)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "preempted: checkpoint saved; requeueing" in text
    saved = preempted_step(text)
    assert "(restart 1)" in text and f"resume: continuing from step {saved} of" in text, text[-4000:]
    assert int(cluster.job_field(job, "Restarts")) == 1
    assert train_losses(out) == pytest.approx(one_node_reference, abs=1e-5)
    assert job_files_left(out) == []


def test_preempted_job_that_may_not_be_requeued_fails_and_says_how_to_resume(cluster, tmp_path):
    # with --no-requeue, `scontrol requeue` is refused: the job must fail (not end COMPLETED, unfinished)
    out = tmp_path / "run"
    job, log = submit(cluster, tmp_path, out, env_extra=hook_env(step_delay_s=1.5), sbatch_args=("--no-requeue",))
    _wait_for_steps(out, 2)
    cluster.slurm("scancel", "--signal=USR1", job)
    state = cluster.wait_job(job, 180)
    text = log.read_text()
    assert state == "FAILED", text[-4000:]
    assert cluster.job_field(job, "ExitCode") == "75:0"
    errors = [line for line in text.splitlines() if line.startswith("dsee_dist: error:")]
    assert len(errors) == 1 and f"scontrol requeue {job} failed" in errors[0], text[-4000:]
    assert "submit the same command again (resume=auto)" in errors[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{preempted_step(text):08d}"
    assert job_files_left(out) == []


def test_lost_node_fails_the_job_in_bounded_time_and_a_resubmission_resumes(cluster, tmp_path, one_node_reference):
    out = tmp_path / "run"
    settings = ("checkpoint.every=2", "deepspeed.timeout_s=15")
    # --no-requeue: with the script's default --requeue, Slurm would requeue the job itself after a node
    # failure; here the job must fail so that a resubmission is what resumes it
    job, log = submit(
        cluster, tmp_path, out, *settings, env_extra=hook_env(step_delay_s=1.5), sbatch_args=("--no-requeue",)
    )
    deadline = time.time() + 240
    while not (out / "checkpoints" / "latest").is_file() and time.time() < deadline:
        time.sleep(0.3)
    cluster.link("node2", up=False)  # node2 drops off the network mid-run
    cut = time.time()
    try:
        # the surviving ranks stop waiting after deepspeed.timeout_s and say why, in one line
        while "lost contact with the other ranks" not in log.read_text() and time.time() - cut < 60:
            time.sleep(0.5)
        noticed_after = time.time() - cut
        # Slurm ends the job once it declares node2 lost (SlurmdTimeout=30 s in this cluster)
        state = cluster.wait_job(job, 150)
    finally:
        cluster.link("node2", up=True)
    text = log.read_text()
    assert noticed_after < 60, text[-3000:]
    assert "resubmit the same job (resume=auto)" in text
    assert state in ("FAILED", "NODE_FAIL", "CANCELLED"), text[-3000:]
    cluster.wait_idle(timeout=120)
    saved_step = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= saved_step < 6
    job2, log2 = submit(cluster, tmp_path, out, *settings)
    state2 = cluster.wait_job(job2, 300)
    text2 = log2.read_text()
    assert state2 == "COMPLETED", text2[-4000:]
    assert f"resume: continuing from step {saved_step}" in text2
    assert train_losses(out) == pytest.approx(one_node_reference, abs=1e-5)
    assert not list(REPO.glob(".dsee-hostfile-*"))  # the killed first job left its files in out, if anywhere


def test_mpirun_two_ranks_find_each_other_through_mpi4py(tmp_path, one_node_reference):
    pytest.importorskip("mpi4py", reason="pip install -e '.[mpi]' (.ci/run does)")
    if shutil.which("mpirun") is None:
        pytest.skip("needs Open MPI: apt-get install openmpi-bin libopenmpi-dev (.ci/run does)")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
        MASTER_PORT=str(free_port()),
        MPIRUN_ARGS="--allow-run-as-root --oversubscribe",
    )
    proc = subprocess.run(
        ["launch/mpi/mpirun.sh", str(hostfile), CONFIG, f"output.dir={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    assert train_losses(out) == pytest.approx(one_node_reference, abs=1e-5)


def test_accelerate_launch_two_nodes_equals_one_node(cluster, tmp_path, one_node_reference):
    pytest.importorskip("accelerate")
    shipped = yaml.safe_load((REPO / "launch/accelerate/multinode.yaml").read_text())
    cpu = {
        **shipped,
        "use_cpu": True,
        "mixed_precision": "no",
        "num_processes": 2,
        "num_machines": 2,
        "main_process_ip": MASTER,
        "main_process_port": free_port(),
    }  # 2 nodes x 1 CPU rank
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump(cpu))
    out = tmp_path / "run"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    procs = [
        cluster.popen_on(
            node,
            [
                *accelerate,
                "--config_file",
                str(config),
                "--machine_rank",
                str(i),
                "-m",
                "dsee_dist.train",
                "--config",
                CONFIG,
                f"output.dir={out}",
            ],
            node_env(),
            tmp_path / f"{node}.log",
        )
        for i, node in enumerate(NODES)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    logs = "".join((tmp_path / f"{node}.log").read_text()[-3000:] for node in NODES)
    assert codes == [0, 0], logs
    assert train_losses(out) == pytest.approx(one_node_reference, abs=1e-5)
