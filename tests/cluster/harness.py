"""A real two-node cluster on one machine: network namespaces as nodes, Debian's Slurm and munge.

Recipe and traps: ../shared/docs/CLUSTER.md. Nodes `node1` (10.231.0.11) and `node2` (10.231.0.21) sit
on a private bridge (10.231.0.1, the controller host `ctl`) with no route anywhere else; each node
process gets its own UTS namespace (hostname) via `unshare --uts`; `nsenter --net` (not `ip netns exec`,
which remounts /sys and stops slurmd). One munged serves every node through its socket file. All state
lives in a private directory; everything started is stopped by PID (process group), never by name, and
the network and /etc/hosts are restored, also when a test fails.

Every wait here is bounded, and every Slurm command has a timeout. `Cluster.log_excerpts()` gives the tail of
slurmctld.log and of each node's slurmd log (kept in `<root>/log`); tests/cluster/conftest.py attaches it to
every failing cluster test, so a failure explains itself.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SUBNET = "10.231.0"
BRIDGE = "dsee-br0"
CTL_ADDR = f"{SUBNET}.1"
NODES = {"node1": f"{SUBNET}.11", "node2": f"{SUBNET}.21"}
HOSTS_MARK = "# dsee-dist test cluster"
REQUIRED = ("slurmctld", "slurmd", "sbatch", "munged", "nsenter", "unshare", "ip")
COMMAND_TIMEOUT = 60  # seconds for any one Slurm or ip command; slurmctld answers in milliseconds when healthy
# One test cluster per machine at a time: the bridge, the namespaces and /etc/hosts entries have fixed names,
# and setting up starts by removing leftovers of those names. A second test session waits for the first.
LOCK = Path("/run/lock" if Path("/run/lock").is_dir() else tempfile.gettempdir()) / "dsee-test-cluster.lock"
LOCK_WAIT = 1800  # seconds; the whole cluster tier takes about 17 min on 2 busy cores
FINAL_STATES = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
)


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED if shutil.which(tool) is None]


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def _quiet(*args: str) -> str:
    """stdout of a teardown command; a failure or a timeout must not stop the rest of the teardown."""
    try:
        return _sh(*args, check=False).stdout
    except subprocess.TimeoutExpired:
        return ""


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
        self.daemons: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self._hosts_backup: str | None = None
        self._lock = None
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------------ setup

    def start(self) -> Cluster:
        self._take_lock()  # before the try: without the lock, stop() would tear down another session's cluster
        try:
            self._network()
            self._hosts()
            self._munge()
            self._slurm()
            self.wait_idle()
        except Exception as exc:
            excerpts = self.log_excerpts()
            self.stop()
            raise RuntimeError(f"the test cluster in {self.root} did not start: {exc}\n{excerpts}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    def _take_lock(self) -> None:
        lock = open(LOCK, "a+")
        deadline = time.time() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    lock.seek(0)
                    holder = lock.read().strip() or "?"
                    lock.close()
                    raise TimeoutError(
                        f"another test cluster (pid {holder}) has held {LOCK} for over {LOCK_WAIT}s; "
                        f"wait for that test session to end"
                    ) from None
                time.sleep(2)
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

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
        self._spawn(
            [
                "munged",
                "-F",
                "--force",
                f"--socket={munge}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/seed",
            ],
            "munged",
        )
        self._wait(lambda: (munge / "munge.socket").exists(), 20, "munged did not create its socket")

    def _slurm(self) -> None:
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs=2 State=UNKNOWN" for n, a in NODES.items())
        self.conf.write_text(SLURM_CONF.format(ctl=CTL_ADDR, root=self.root, nodes=nodes, node_names=",".join(NODES)))
        # the controller runs in the root network namespace, under the hostname `ctl` (its own UTS namespace)
        self._spawn(
            [
                "unshare",
                "--uts",
                "sh",
                "-c",
                'hostname ctl && exec "$@"',
                "sh",
                "slurmctld",
                "-D",
                "-i",
                "-f",
                str(self.conf),
            ],
            "slurmctld",
        )
        for node in NODES:
            self._spawn(in_node(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)]), f"slurmd-{node}")

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        self.daemons[name] = proc
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

    def slurm(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                list(argv), capture_output=True, text=True, env=self.env, check=check, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"'{' '.join(argv)}' did not return within {timeout}s; slurmctld is not answering "
                f"(see {self.root}/log/slurmctld.log)"
            ) from None

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

    def wait_job(self, job_id: str, timeout: float, states=FINAL_STATES) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout}s")

    def wait_requeued(self, job_id: str, restarts: int, timeout: float) -> None:
        """Wait until job `job_id` has been requeued `restarts` times and its previous run has fully left the
        nodes, so that shortening the BeginTime hold (`scontrol update StartTime=now`) cannot race with it.

        After `scontrol requeue` slurmctld shows the job PENDING while the old run's slurmstepd processes may
        still be ending on the nodes (seen: 3 s), and each slurmd has revoked the job's credential as of the
        kill, to the second: a launch whose credential is from that same second is refused ("Job N already
        killed, do not launch batch job") and the job ends FAILED. Slurm's own hold (BeginTime = requeue +
        credential lifetime + 1 s, 121 s by default) avoids both; a test that shortens it must wait for:
        the controller (PENDING, no COMPLETING, no steps), the nodes (no slurmstepd of the job, a
        "done with job" line in the slurmd log for every step launched there) and one more wall-clock second.
        """
        deadline = time.time() + timeout
        checks = {
            f"requeued ({restarts}) and PENDING at the controller": lambda: self._requeued_pending(job_id, restarts),
            "without steps at the controller": lambda: (
                not self.slurm("squeue", "-h", "-s", "-j", job_id).stdout.strip()
            ),
            "without a slurmstepd on the nodes": lambda: not self.job_processes(job_id),
            "with 'done with job' in the slurmd logs for every step": lambda: not self.steps_not_done(job_id),
        }
        while True:
            state = self.job_state(job_id)
            if state in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended {state} instead of being requeued")
            failing = next((name for name, check in checks.items() if not check()), None)
            if failing is None:
                break
            if time.time() > deadline:
                raise TimeoutError(
                    f"job {job_id} not {failing} after {timeout}s: state {state}, "
                    f"Restarts={self.job_field(job_id, 'Restarts')}, slurmstepd {self.job_processes(job_id)}, "
                    f"steps without 'done with job' {self.steps_not_done(job_id)}"
                )
            time.sleep(0.3)
        # the credential revocation is as of the kill, which happened before now: one wall-clock second later
        # a new credential is strictly newer
        settled = time.time()
        while time.time() < int(settled) + 2:
            time.sleep(0.1)

    def _requeued_pending(self, job_id: str, restarts: int) -> bool:
        out = self.slurm("scontrol", "show", "job", job_id, check=False).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        # JobState shows COMPLETING or REQUEUED while the old run is still being torn down
        return fields.get("JobState") == "PENDING" and int(fields.get("Restarts", "0")) >= restarts

    def job_processes(self, job_id: str) -> list[str]:
        """Process titles of the job's slurmstepd processes still alive on any node."""
        found = []
        for node in NODES:
            for pid in _sh("ip", "netns", "pids", netns(node), check=False).stdout.split():
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if title.startswith(f"slurmstepd: [{job_id}."):
                    found.append(f"{node}:{title.strip()}")
        return found

    def steps_not_done(self, job_id: str) -> list[str]:
        """Steps of the job that a slurmd launched more often than it logged "[job.step] done with job"."""
        missing = []
        for node in NODES:
            log = self.root / "log" / f"slurmd-{node}.log"
            text = log.read_text(errors="replace") if log.is_file() else ""
            launched = re.findall(rf"launch task StepId={job_id}\.(\d+) ", text)
            launched += ["batch"] * len(re.findall(rf"Launching batch job {job_id} ", text))
            for step in sorted(set(launched)):
                done = text.count(f"[{job_id}.{step}] done with job")
                if done < launched.count(step):
                    missing.append(f"{node}:{job_id}.{step}")
        return missing

    def log_excerpts(self, lines: int = 40) -> str:
        """The last `lines` lines of slurmctld.log and of each slurmd log, and the output of any daemon that
        has exited (a daemon that dies at start may not get as far as its log file)."""
        parts = []
        for path in [self.root / "log" / "slurmctld.log", *(self.root / "log" / f"slurmd-{n}.log" for n in NODES)]:
            parts.extend(self._tail(path, lines))
        for name, proc in self.daemons.items():
            if proc.poll() is not None:
                parts.append(f"--- {name} exited with status {proc.returncode}")
                parts.extend(self._tail(self.root / f"{name}.out", lines))
        return "\n".join(parts)

    @staticmethod
    def _tail(path: Path, lines: int) -> list[str]:
        if not path.is_file():
            return [f"--- {path}: missing"]
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return [f"--- {path} (last {min(lines, len(text))} of {len(text)} lines)", *text[-lines:]]

    def popen_on(self, node: str, command: list[str], env: dict, log: Path) -> subprocess.Popen:
        out = open(log, "w")
        proc = subprocess.Popen(
            in_node(node, command), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def link(self, node: str, up: bool) -> None:
        index = list(NODES).index(node)
        _sh("ip", "link", "set", f"dsee-v{index}", "up" if up else "down")

    # ------------------------------------------------------------------ teardown

    def stop(self) -> None:
        if self.conf.is_file():  # jobs first, so that no step outlives its slurmd
            try:
                self.slurm("scancel", "--full", "--partition=debug", check=False, timeout=20)
            except TimeoutError:
                pass  # slurmctld is gone; its jobs' processes are killed below
        for node in NODES:  # whatever still runs inside a node, by PID
            pids = _quiet("ip", "netns", "pids", netns(node)).split()
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
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass  # unkillable (D state); the OS reaps it, and the network teardown below does not need it
        self.procs.clear()
        self._cleanup_network()
        if self._hosts_backup is not None:
            Path("/etc/hosts").write_text(self._hosts_backup)
            self._hosts_backup = None
        if self._lock is not None:  # last: the next cluster may now set up the same names
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    @staticmethod
    def _cleanup_network() -> None:
        for node in NODES:
            _quiet("ip", "netns", "del", netns(node))
        _quiet("ip", "link", "del", BRIDGE)
