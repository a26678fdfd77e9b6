"""Every launcher line shown to users (README.md, configs/, launch/) parses with the launcher's own argument
parser and names a module that exists: a `deepspeed ... -m` line (the runner only knows `--module`) fails here."""

from __future__ import annotations

import importlib.util
import re
import shlex

import pytest

from tests.conftest import REPO

LAUNCHERS = ("deepspeed ", "torchrun ", "accelerate launch ", "python -m dsee_dist", "python3 -m dsee_dist")


def documented_lines() -> list[tuple[str, str]]:
    """(where, command) for every launcher command line in the docs, configs and launch scripts' comments."""
    sources = [
        REPO / "README.md",
        *sorted((REPO / "configs").rglob("*.yaml")),
        *sorted((REPO / "configs").rglob("*.md")),
        *sorted((REPO / "launch").rglob("*.sh")),
        *sorted((REPO / "launch").rglob("*.sbatch")),
    ]
    found = []
    for path in sources:
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continued lines
        for number, raw in enumerate(text.splitlines(), 1):
            for piece in re.findall(r"`([^`]+)`", raw) if "`" in raw else [raw]:
                line = piece.strip().lstrip("#").strip()
                line = re.split(r"\s+#\s", line)[0]  # trailing comment
                if line.startswith("+ "):
                    line = line[2:]
                if line.startswith(LAUNCHERS) and "dsee_dist" in line and "$(" not in line:
                    found.append((f"{path.relative_to(REPO)}:{number}", line))
    return found


def _module_of(argv: list[str]) -> str | None:
    for flag in ("--module", "-m"):
        if flag in argv:
            return argv[argv.index(flag) + 1]
    return None


def _expand(command: str) -> str:
    """Shell variables replaced by values of the kind the launcher expects (ranks and ports are integers)."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        return "0" if re.search(r"RANK|PORT|NODES|GPUS|NUM", name) else "node1"

    return re.sub(r"\$\{?(\w+)\}?", value, command)


def _check(command: str) -> None:
    argv = shlex.split(_expand(command))
    if argv[0] == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        args = parse_args(argv[1:])
        if args.user_script.startswith("dsee_dist"):
            assert args.module, "deepspeed runs a dsee_dist module only with --module"
        module = args.user_script if args.module else None
    elif argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(argv[1:])
        module = args.training_script if args.module else None
    elif argv[:2] == ["accelerate", "launch"]:
        from accelerate.commands.launch import launch_command_parser

        args = launch_command_parser().parse_args(argv[2:])
        module = args.training_script if args.module else None
    else:
        module = _module_of(argv)
    if module is not None and module.startswith("dsee_dist"):
        assert importlib.util.find_spec(module) is not None, f"no module {module}"


LINES = documented_lines()


def test_documentation_shows_launcher_lines():
    launchers = {line.split()[0] for _, line in LINES}
    assert {"deepspeed", "torchrun", "accelerate"} <= launchers, launchers


@pytest.mark.parametrize("where,command", LINES, ids=[where for where, _ in LINES])
def test_documented_launcher_line_parses(where, command):
    try:
        _check(command)
    except SystemExit as exc:  # argparse's way of refusing a flag
        pytest.fail(f"{where}: the launcher rejects `{command}` (exit {exc.code})")
