"""Writing files and directories atomically: everything goes to a temporary name next to the target, which
is renamed over the target (`os.replace`) only once complete. A reader therefore sees the old version or the
new one, never a half-written file, even after a crash or kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def temporary_name(target: Path) -> Path:
    """The name a write to `target` goes to first (unique per process, so ranks never share one)."""
    target = Path(target)
    return target.with_name(f"{target.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write `target`'s content to (with any writer: torch.save, save_file, ...);
    renamed to `target` when the block ends without error, removed otherwise."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_lines_atomic(target: str | os.PathLike, lines: list[str]) -> None:
    """One line per item, each ending with a newline (an empty item is an empty line)."""
    write_text_atomic(target, "".join(line + "\n" for line in lines))


def write_json_atomic(target: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """`obj` as JSON text ending with a newline."""
    write_text_atomic(target, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary directory to fill; when the block ends without error it replaces `target` (an
    existing `target` is removed first), otherwise it is removed."""
    target = Path(target)
    tmp = temporary_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
