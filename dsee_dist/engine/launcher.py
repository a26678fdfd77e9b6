"""Command lines that start multi-rank jobs on this host with DeepSpeed's launcher, and the environment
they run in. (No deepspeed import: these only build argument lists.)"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

TRAIN_MODULE = "dsee_dist.train"


def default_torch_extensions_dir() -> Path:
    """Where DeepSpeed's compiled ops are cached unless TORCH_EXTENSIONS_DIR says otherwise."""
    return Path.home() / ".cache" / "dsee_dist" / "torch_extensions"


def launch_env(env: dict | None = None) -> dict:
    """A copy of `env` (default: this process's) with TORCH_EXTENSIONS_DIR defaulted."""
    out = dict(os.environ if env is None else env)
    out.setdefault("TORCH_EXTENSIONS_DIR", str(default_torch_extensions_dir()))
    return out


def free_port() -> int:
    """A TCP port free on this host right now (for MASTER_PORT). Chosen on the dual-stack wildcard address, where
    torch's TCPStore listens, so that a port busy only there (e.g. an IPv6 socket of an earlier store) is not
    offered; IPv4 loopback where the host has no IPv6."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
            return s.getsockname()[1]
    except OSError:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def deepspeed_command(ranks: int, target: list[str], *, master_port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port PORT TARGET...`, where TARGET is `--module NAME ARGS...` or
    `SCRIPT ARGS...`; a free port when none is given."""
    port = master_port if master_port is not None else free_port()
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        *target,
    ]


def training_command(ranks: int, args: list[str], *, master_port: int | None = None) -> list[str]:
    """`python -m dsee_dist.train ARGS` in this process for one rank, under the deepspeed launcher for more."""
    if ranks == 1:
        return [sys.executable, "-m", TRAIN_MODULE, *args]
    return deepspeed_command(ranks, ["--module", TRAIN_MODULE, *args], master_port=master_port)
