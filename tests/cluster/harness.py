"""A real two-node cluster on one machine: network namespaces as nodes, Debian's Slurm and munge.

Recipe and traps: ../shared/docs/CLUSTER.md. Nodes `node1` (10.231.0.11) and `node2` (10.231.0.21) sit
on a private bridge (10.231.0.1, the controller host `ctl`) with no route anywhere else; each node
process gets its own UTS namespace (hostname) via `unshare --uts`; `nsenter --net` (not `ip netns exec`,
which remounts /sys and stops slurmd). One munged serves every node through its socket file. All state
lives in a private directory; everything started is stopped by PID (process group), never by name, and
the network and /etc/hosts are restored, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.231.0"
BRIDGE = "dsee-br0"
CTL_ADDR = f"{SUBNET}.1"
NODES = {"node1": f"{SUBNET}.11", "node2": f"{SUBNET}.21"}
HOSTS_MARK = "# dsee-dist test cluster"
REQUIRED = ("slurmctld", "slurmd", "sbatch", "munged", "nsenter", "unshare", "ip")


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED if shutil.which(tool) is None]


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def netns(node: str) -> str:
    return f"dsee-{node}"


def in_node(node: str, command: list[str]) -> list[str]:
    """argv that runs `command` inside `node`'s network namespace with hostname `node`."""
    script = f'hostname {node} && exec "$@"'
    return ["nsenter", f"--net=/run/netns/{netns(node)}", "unshare", "--uts", "sh", "-c", script, "sh", *command]


SLURM_CONF = """\
ClusterName=dseetest
MailProg=/bin/true
SlurmctldHost=ctl({ctl})
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerParameters=defer_batch=0
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
KillWait=10
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self._hosts_backup: str | None = None
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------------ setup

    def start(self) -> "Cluster":
        try:
            self._network()
            self._hosts()
            self._munge()
            self._slurm()
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        self._cleanup_network()
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{CTL_ADDR}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        for i, (node, addr) in enumerate(NODES.items()):
            ns, host_end = netns(node), f"dsee-v{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", f"dsee-e{i}")
            _sh("ip", "link", "set", host_end, "master", BRIDGE)
            _sh("ip", "link", "set", host_end, "up")
            _sh("ip", "link", "set", f"dsee-e{i}", "netns", ns)
            _sh("ip", "-n", ns, "link", "set", f"dsee-e{i}", "name", "eth0")
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _hosts(self) -> None:
        hosts = Path("/etc/hosts")
        self._hosts_backup = hosts.read_text()
        lines = [f"{CTL_ADDR} ctl {HOSTS_MARK}"] + [f"{addr} {node} {HOSTS_MARK}" for node, addr in NODES.items()]
        kept = [line for line in self._hosts_backup.splitlines() if HOSTS_MARK not in line]
        hosts.write_text("\n".join(kept + lines) + "\n")

    def _munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(parents=True, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn(["munged", "-F", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
                     f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed"],
                    "munged")
        self._wait(lambda: (munge / "munge.socket").exists(), 20, "munged did not create its socket")

    def _slurm(self) -> None:
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs=2 State=UNKNOWN" for n, a in NODES.items())
        self.conf.write_text(SLURM_CONF.format(ctl=CTL_ADDR, root=self.root, nodes=nodes, node_names=",".join(NODES)))
        # the controller runs in the root network namespace, under the hostname `ctl` (its own UTS namespace)
        self._spawn(["unshare", "--uts", "sh", "-c", 'hostname ctl && exec "$@"', "sh",
                     "slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for node in NODES:
            self._spawn(in_node(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)]), f"slurmd-{node}")

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _wait(condition, timeout: float, message: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise TimeoutError(message)

    def wait_idle(self, timeout: float = 60) -> None:
        def idle() -> bool:
            out = self.slurm("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n) == "idle" for n in NODES)

        self._wait(idle, timeout, f"the Slurm nodes did not become idle; see {self.root}/log")

    # ------------------------------------------------------------------ use

    def slurm(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env, check=check)

    def sbatch(self, *argv: str) -> str:
        out = self.slurm("sbatch", "--parsable", *argv).stdout.strip()
        return out.split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = self.slurm("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str | None:
        out = self.slurm("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith(name + "="):
                return field.split("=", 1)[1]
        return None

    def wait_job(self, job_id: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout}s")

    def popen_on(self, node: str, command: list[str], env: dict, log: Path) -> subprocess.Popen:
        out = open(log, "w")
        proc = subprocess.Popen(in_node(node, command), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def link(self, node: str, up: bool) -> None:
        index = list(NODES).index(node)
        _sh("ip", "link", "set", f"dsee-v{index}", "up" if up else "down")

    # ------------------------------------------------------------------ teardown

    def stop(self) -> None:
        if self.conf.is_file():  # jobs first, so that no step outlives its slurmd
            self.slurm("scancel", "--full", "--partition=debug", check=False)
        for node in NODES:  # whatever still runs inside a node, by PID
            pids = _sh("ip", "netns", "pids", netns(node), check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self.procs.clear()
        self._cleanup_network()
        if self._hosts_backup is not None:
            Path("/etc/hosts").write_text(self._hosts_backup)
            self._hosts_backup = None

    @staticmethod
    def _cleanup_network() -> None:
        for node in NODES:
            _sh("ip", "netns", "del", netns(node), check=False)
        _sh("ip", "link", "del", BRIDGE, check=False)
