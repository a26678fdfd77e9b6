"""Every command shown to users (README.md, docs/*.md, configs/, launch/) is true to the code.

- Launcher lines (`deepspeed`, `torchrun`, `accelerate launch`, `python -m dsee_dist...`) parse with the launcher's
  own argument parser and name a module that exists: a `deepspeed ... -m` line (the runner only knows
  `--module`) fails here.
- Every command line (those, `dsee-dist ...`, `srun`/`sbatch`/`launch/...` lines, `python bench/...`): the files
  it names under configs/, launch/ and bench/ exist; its `section.key=value` overrides are keys of the config
  schema (merged over the YAML it names, whose own keys are checked too); every `--flag` it gives a dsee_dist
  program is an option of that program's parser (subcommands followed), and a complete command in a code block
  parses with that parser; a `python bench/X.py --flag` names a flag that bench/ defines.
- README's first screen keeps the two set-up commands, and its test command is the one .ci/run runs.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import logging
import re
import runpy
import shlex
import sys
import warnings

import pytest

from tests.conftest import REPO

LAUNCHERS = ("deepspeed ", "torchrun ", "accelerate launch ", "python -m dsee_dist", "python3 -m dsee_dist")
# Any command line a user may copy: the launchers, the CLI, the scripts of launch/ and bench/, Slurm.
COMMANDS = (*LAUNCHERS, "dsee-dist ", "launch/", "sbatch ", "srun ", "mpirun ", "python bench/", "python3 bench/")
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Leading environment assignments of a command line: `MASTER_ADDR=node001 NODE_RANK=0 launch/...`.
ENV_PREFIX = re.compile(r"""^(?:[A-Z_][A-Z0-9_]*=(?:"[^"]*"|'[^']*'|\S*)\s+)+""")
OVERRIDE = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)=(.*)$", re.S)
REPO_PATH = re.compile(r"^(?:configs|launch|bench)/[\w./*-]+$")


def _sources():
    return [
        *DOCS,
        *sorted((REPO / "configs").rglob("*.yaml")),
        *sorted((REPO / "configs").rglob("*.md")),
        *sorted((REPO / "launch").rglob("*.sh")),
        *sorted((REPO / "launch").rglob("*.sbatch")),
    ]


def documented_commands() -> list[tuple[str, str, bool]]:
    """(where, command, whole) for every command line in the docs, configs and launch scripts' comments;
    `whole` is false for a command quoted inside a sentence or written with placeholders (`[--flag N]`, `...`)."""
    found = []
    for path in _sources():
        text = re.sub(r"\\\n\s*", " ", path.read_text())  # join continued lines
        for number, raw in enumerate(text.splitlines(), 1):
            inline = "`" in raw
            for piece in re.findall(r"`([^`]+)`", raw) if inline else [raw]:
                line = piece.strip().lstrip("#").strip()
                line = re.split(r"\s+#\s", line)[0]  # trailing comment
                if line.startswith("+ "):
                    line = line[2:]
                bare = ENV_PREFIX.sub("", line)
                if bare.startswith(COMMANDS) and "$(" not in line:
                    whole = not inline and not re.search(r"\[|\.\.\.|\bN\b", line)
                    found.append((f"{path.relative_to(REPO)}:{number}", line, whole))
    return found


def documented_lines() -> list[tuple[str, str]]:
    """(where, command) for every launcher command line that runs dsee_dist."""
    return [
        (where, line) for where, line, _ in documented_commands() if line.startswith(LAUNCHERS) and "dsee_dist" in line
    ]


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


# ------------------------------------------------------------------ what a command names: files, keys, flags


def _tokens(command: str) -> list[str]:
    """The command's words, shell variables expanded, leading environment assignments and the brackets and
    ellipses of usage notation (`[--nnodes N]`, `[key=value ...]`) removed."""
    words = shlex.split(_expand(ENV_PREFIX.sub("", command)))
    return [w.strip("[]") for w in words if w.strip("[]") not in ("", "...")]


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    """(module, its arguments) when the command runs a dsee_dist program, whatever launches it."""
    if words[0] == "dsee-dist":
        return "dsee_dist", words[1:]
    if words[0] == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        args = parse_args(words[1:])
        return (args.user_script, args.user_args) if args.module else None
    if words[0] == "torchrun" or words[:2] == ["accelerate", "launch"]:
        if words[0] == "torchrun":
            from torch.distributed.run import get_args_parser

            args = get_args_parser().parse_args(words[1:])
        else:
            from accelerate.commands.launch import launch_command_parser

            args = launch_command_parser().parse_args(words[2:])
        return (args.training_script, args.training_script_args) if args.module else None
    for i, word in enumerate(words):  # python -m M ..., srun ... python -m M ...
        if re.fullmatch(r"python3?", word) and words[i + 1 : i + 2] == ["-m"]:
            return words[i + 2], words[i + 3 :]
    return None


class _Captured(BaseException):
    """Raised in place of parsing: carries the program's parser out before it does anything."""

    def __init__(self, parser: argparse.ArgumentParser, method: str, args: list[str]):
        self.parser, self.method, self.args = parser, method, args


@contextlib.contextmanager
def _quiet_state():
    """Whatever an entry point sets up before parsing (its logger, warning filters) is put back afterwards."""
    log = logging.getLogger("dsee_dist")
    saved = (list(log.handlers), log.level, log.propagate, sys.argv)
    with warnings.catch_warnings():
        try:
            yield
        finally:
            log.handlers[:], log.level, log.propagate, sys.argv = saved[0], saved[1], saved[2], saved[3]


def _parser_of(module: str, argv: list[str]) -> _Captured:
    """The argparse parser a dsee_dist program builds for `argv`, the method it parses with and the words it
    would parse (a subcommand's own parser gets the words after the subcommand), taken from the program's own
    entry (run as `python -m module argv`) at the moment it would parse."""

    def capture(method):
        def parse(self, args=None, namespace=None):
            raise _Captured(self, method, list(sys.argv[1:] if args is None else args))

        return parse

    names = ("parse_args", "parse_intermixed_args")
    originals = {name: getattr(argparse.ArgumentParser, name) for name in names}
    try:
        for name in names:
            setattr(argparse.ArgumentParser, name, capture(name))
        with _quiet_state():
            sys.argv = [module, *argv]
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except _Captured as got:
        return got
    finally:
        for name, fn in originals.items():
            setattr(argparse.ArgumentParser, name, fn)
    raise AssertionError(f"{module} ran without parsing a command line")


def _subcommand_parser(parser: argparse.ArgumentParser, args: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that reads the options: subcommands followed as long as the words name one."""
    for word in args:
        if word.startswith("-"):
            continue
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            break
        parser = choices[word]
    return parser


def _check_program(module: str, args: list[str], whole: bool) -> None:
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    got = _parser_of(module, args)
    parser, args = got.parser, got.args
    options = _subcommand_parser(parser, args)
    known = set(options._option_string_actions)
    for word in args:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") or re.fullmatch(r"-[a-zA-Z]", flag):
            assert flag in known, f"{options.prog} has no option {flag} (it has {', '.join(sorted(known))})"
    if whole:
        with _quiet_state():
            try:
                getattr(argparse.ArgumentParser, got.method)(parser, args)
            except SystemExit as exc:
                pytest.fail(f"{parser.prog} rejects {shlex.join(args)} (exit {exc.code})")


def _check_paths(words: list[str]) -> list[str]:
    """The configs/, launch/ and bench/ files the words name all exist; returns the experiment YAMLs."""
    yamls = []
    for word in words:
        for value in (word, word.split("=", 1)[-1]):
            if REPO_PATH.match(value) and not value.endswith("..."):  # `configs/...`: any config
                assert glob.glob(str(REPO / value)), f"{value} does not exist"
                if value.startswith("configs/") and value.endswith(".yaml"):
                    yamls.append(value)
    return yamls


def _check_overrides(words: list[str], yamls: list[str]) -> None:
    """`section.key=value` words are keys of the schema, checked over the named YAML as training would."""
    from dsee_dist.config import Config, merge_nested, parse_overrides, resolve_extends
    from dsee_dist.config.loading import build_section, load_yaml

    top = {f for f in Config.__dataclass_fields__ if f != "source_dir"}
    overrides = [w for w in words if (m := OVERRIDE.match(w)) and m.group(1).split(".")[0] in top | {"ds"}]
    if not overrides and not yamls:
        return
    data = {}
    if len(yamls) == 1:
        path = REPO / yamls[0]
        data = resolve_extends(path, load_yaml(path.read_text()) or {})
    build_section(Config, merge_nested(data, parse_overrides(overrides)))  # an unknown key raises ConfigError


def _check_bench(words: list[str]) -> None:
    """`python bench/X.py --flag`: every flag is defined somewhere in bench/ (scripts share their helpers)."""
    defined = "\n".join(p.read_text() for p in (REPO / "bench").glob("*.py"))
    for word in words[2:]:
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            assert f'"{flag}"' in defined, f"no bench/ script defines {flag}"


def check_command(command: str, whole: bool) -> None:
    words = _tokens(command)
    yamls = _check_paths(words)
    try:
        program = _program(words)
    except SystemExit:  # a launcher's parser refused the words
        if whole or "dsee_dist" in command:
            raise
        program = None  # a launcher named in a sentence (`deepspeed --module`), not a command
    if program is not None and program[0].startswith("dsee_dist"):
        _check_program(program[0], list(program[1]), whole)
    if re.fullmatch(r"python3?", words[0]) and words[1:2] and words[1].startswith("bench/"):
        _check_bench(words)
    if program is None or program[0] in ("dsee_dist", "dsee_dist.train"):
        _check_overrides(words, [y for y in yamls if not y.startswith("configs/ds/")])


LINES = documented_lines()
COMMAND_LINES = documented_commands()


def test_documentation_shows_launcher_lines():
    launchers = {line.split()[0] for _, line in LINES}
    assert {"deepspeed", "torchrun", "accelerate"} <= launchers, launchers


def test_every_doc_is_read():
    """The command checks reach README and every page of docs/."""
    places = {where.split(":")[0] for where, _, _ in COMMAND_LINES}
    assert {"README.md", "docs/cli.md", "docs/config.md", "docs/launching.md"} <= places, sorted(places)


@pytest.mark.parametrize("where,command", LINES, ids=[where for where, _ in LINES])
def test_documented_launcher_line_parses(where, command):
    try:
        _check(command)
    except SystemExit as exc:  # argparse's way of refusing a flag
        pytest.fail(f"{where}: the launcher rejects `{command}` (exit {exc.code})")


@pytest.mark.parametrize("where,command,whole", COMMAND_LINES, ids=[where for where, _, _ in COMMAND_LINES])
def test_documented_command_names_real_files_keys_and_flags(where, command, whole):
    from dsee_dist.errors import ConfigError

    try:
        check_command(command, whole)
    except (AssertionError, ConfigError) as exc:
        pytest.fail(f"{where}: `{command}`: {exc}")
    except SystemExit as exc:
        pytest.fail(f"{where}: a launcher rejects `{command}` (exit {exc.code})")


@pytest.mark.parametrize(
    "command",
    [
        "dsee-dist generate runs/x --input a.csv --output b.txt --beams 4",  # a flag generate lacks
        "dsee-dist export runs/x --gguf out/m.gguf --gguf-type q4_0",  # a choice export lacks
        "python -m dsee_dist.train --config configs/no_such.yaml",  # a config that is not there
        "deepspeed --num_gpus 2 --module dsee_dist.train --config configs/gpt2_e2e.yaml train.learning_rate=1e-3",
        "dsee-dist quickstart --tiny prune.ratios=0.5",  # a key the schema lacks
        "python bench/quality.py --model m --quickly",  # a flag bench/ lacks
    ],
)
def test_a_wrong_command_fails_the_check(command):
    from dsee_dist.errors import ConfigError

    with pytest.raises((AssertionError, ConfigError, pytest.fail.Exception)):
        check_command(command, whole=True)


def _fenced_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_first_screen_keeps_the_setup_and_test_commands():
    """README's two set-up commands come first, as fenced blocks, and its test command is what .ci/run runs."""
    blocks = _fenced_blocks((REPO / "README.md").read_text())
    assert blocks[0] == 'pip install torch==2.13.0 && pip install -e ".[test]" && dsee-dist quickstart', blocks[:2]
    assert blocks[1] == "python -m pytest -q", blocks[:2]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^python3? -m pytest -q\b", ci, re.M), "`.ci/run` no longer runs README's test command"


# ------------------------------------------------------------------ config keys and links in the prose

SECTION_KEY = re.compile(r"^(model|data|dsee|train|eval|generate|checkpoint|prune|output|deepspeed)((?:\.\w+)+)(=.*)?$")


def _schema_has(key: str) -> bool:
    """Whether `section.key[.sub]` is a key of the config schema (`deepspeed.overrides.*` is free-form)."""
    import dataclasses
    import typing

    from dsee_dist.config import Config

    cls = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        if part not in {f.name for f in dataclasses.fields(cls)}:
            return False
        cls = typing.get_type_hints(cls)[part]
        if cls is dict:
            return True
    return True


def _prose_keys() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for piece in re.findall(r"`([^`]+)`", line):
                for word in piece.split():
                    if (m := SECTION_KEY.match(word.rstrip(",;:"))) and m.group(2) != ".key":  # `data.key=value`
                        found.append((f"{path.relative_to(REPO)}:{number}", m.group(1) + m.group(2)))
    return found


def test_every_config_key_the_docs_name_exists():
    keys = _prose_keys()
    assert len(keys) > 50, "the docs name config keys in backticks; the pattern no longer finds them"
    missing = [f"{where}: {key}" for where, key in keys if not _schema_has(key)]
    assert not missing, "config keys the schema does not have:\n" + "\n".join(missing)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path) -> set[str]:
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            anchors.add(_anchor(m.group(1)))
    return anchors


def test_readme_links_every_doc_and_every_link_resolves():
    readme = (REPO / "README.md").read_text()
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in readme, f"README does not link docs/{doc.name}"
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
