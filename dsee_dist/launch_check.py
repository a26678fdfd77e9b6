"""Checks run before any rank starts: hostfile, node count against the allocation, rendezvous address.

    python -m dsee_dist.launch_check --hostfile hostfile [--nnodes 2] [--multi-node]

Prints one line naming the problem and the fix and exits 2, or prints a one-line summary and exits 0.
The launch scripts in launch/ call it first, so a bad hostfile or allocation never reaches
`deepspeed`, whose own errors arrive as a traceback from every rank.

Hostfile format (DeepSpeed and MPI): one `hostname slots=N` per line; `#` starts a comment.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from dsee_dist.errors import DSEEError

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-]+)\s+slots\s*=\s*(?P<slots>\S+)$")


def parse_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """{host: slots} in file order. Raises DSEEError naming the file and line of the first problem."""
    path = Path(path)
    if not path.is_file():
        raise DSEEError(
            f"hostfile '{path}' does not exist; write one 'hostname slots=N' line per node (see hostfile.example)"
        )
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise DSEEError(f"{path}:{lineno}: '{line}' is not of the form 'hostname slots=N'")
        host, slots = match.group("host"), match.group("slots")
        if not slots.isdigit() or int(slots) < 1:
            raise DSEEError(
                f"{path}:{lineno}: slots must be a positive integer (GPUs or ranks on {host}), got '{slots}'"
            )
        if host in hosts:
            raise DSEEError(f"{path}:{lineno}: host '{host}' is listed twice; give each node one line")
        hosts[host] = int(slots)
    if not hosts:
        raise DSEEError(f"hostfile '{path}' lists no hosts; write one 'hostname slots=N' line per node")
    return hosts


def check_allocation(hosts: dict[str, int] | None, nnodes: int | None, env: dict[str, str]) -> None:
    """Node counts must agree with each other and, inside Slurm, with the allocation."""
    if hosts is not None and nnodes is not None and nnodes != len(hosts):
        raise DSEEError(f"--nnodes {nnodes} does not match the {len(hosts)} hosts in the hostfile; make them agree")
    slurm_nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    wanted = nnodes if nnodes is not None else (len(hosts) if hosts is not None else None)
    if slurm_nodes and wanted is not None and int(slurm_nodes) != wanted:
        raise DSEEError(
            f"the job asks for {wanted} nodes but the Slurm allocation has {slurm_nodes}; "
            f"match sbatch --nodes to the hostfile / --nnodes"
        )


def check_rendezvous(env: dict[str, str], multi_node: bool) -> None:
    """Outside Slurm a multi-node job needs MASTER_ADDR (inside, the scripts derive it from the node list)."""
    in_slurm = "SLURM_JOB_ID" in env
    if multi_node and not in_slurm and not env.get("MASTER_ADDR"):
        raise DSEEError(
            "MASTER_ADDR is not set; export MASTER_ADDR=<address of the first node> "
            "(and MASTER_PORT) on every node before launching"
        )
    port = env.get("MASTER_PORT")
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536):
        raise DSEEError(f"MASTER_PORT '{port}' is not a TCP port number; use e.g. 29500")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsee_dist.launch_check", description=__doc__.split("\n")[0])
    parser.add_argument("--hostfile", help="DeepSpeed/MPI hostfile to validate")
    parser.add_argument("--nnodes", type=int, help="number of nodes the launch expects")
    parser.add_argument("--multi-node", action="store_true", help="the launch spans several nodes")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    try:
        hosts = parse_hostfile(args.hostfile) if args.hostfile else None
        check_allocation(hosts, args.nnodes, env)
        multi = args.multi_node or (hosts is not None and len(hosts) > 1) or (args.nnodes or 1) > 1
        check_rendezvous(env, multi)
    except DSEEError as exc:
        print(f"dsee_dist: error: {exc}", file=sys.stderr)
        return exc.exit_code
    where = f"{len(hosts)} hosts, {sum(hosts.values())} slots" if hosts else f"{args.nnodes or 1} node(s)"
    print(f"[dsee] launch check passed: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
