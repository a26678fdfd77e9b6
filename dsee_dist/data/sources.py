"""Reading a data source into an Arrow dataset (Hugging Face `datasets`): a local JSONL / JSON / Parquet / CSV /
Arrow / text file, a directory of such files, a `save_to_disk` directory, or a hub dataset name.

Files are checked to be UTF-8 first (pyarrow's JSON reader would otherwise replace bad bytes without a word);
every failure becomes one DSEEError naming the source and the fix.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
from pathlib import Path

from dsee_dist.errors import DSEEError

logger = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text"}
TEXT_BUILDERS = ("json", "csv", "text")


def check_utf8(path: Path) -> None:
    """Raise naming the line of the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line += chunk[: exc.start].count(b"\n")
                raise DSEEError(
                    f"{path}:{line}: not UTF-8 text (byte 0x{chunk[exc.start]:02x}); re-encode the file as UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8)"
                ) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DSEEError(f"{path}: ends inside a UTF-8 character (truncated file?)") from None


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars (reading and saving Arrow files is quick; tokenising keeps its bar) and no log lines:
    datasets logs its own copy of a loading error, and ours is the one line the user sees."""
    import datasets

    level, bars_on = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars_on:
            datasets.enable_progress_bars()


def _files_of(path: Path, default_builder: str) -> tuple[str, list[Path]]:
    """(builder, files) of a data file (of any name: an unknown suffix is read as the format's own kind) or of a
    directory of data files of one known kind."""
    if path.is_file():
        return BUILDERS.get(path.suffix.lower(), default_builder), [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
        raise DSEEError(f"{path}: no data files in it (looked for {', '.join(BUILDERS)})")
    kinds = {BUILDERS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise DSEEError(
            f"{path}: holds data files of several kinds ({', '.join(sorted(kinds))}); keep one per directory"
        )
    return kinds.pop(), files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def load_source(source: str, *, split: str, cache_dir: Path, default_builder: str = "json"):
    """The rows of `source` as a `datasets.Dataset` (memory-mapped Arrow); a file with a suffix not in BUILDERS is
    read with `default_builder`."""
    import datasets

    path = Path(source)
    with quiet_datasets():
        if _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DSEEError(
                        f"{path}: has no split '{split}' (it has: {', '.join(loaded)}); set data.train_split / "
                        "data.eval_split"
                    )
                loaded = loaded[split]
            return loaded
        if path.exists():
            builder, files = _files_of(path, default_builder)
            for f in files:
                if builder in TEXT_BUILDERS:
                    check_utf8(f)
                if f.stat().st_size == 0:
                    raise DSEEError(f"{f}: the file is empty")
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            try:
                return datasets.load_dataset(
                    builder, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir), **kwargs
                )
            except Exception as exc:  # noqa: BLE001 - reported as one line naming the file
                cause = exc.__cause__ or exc
                raise DSEEError(f"{path}: cannot be read as {builder}: {str(cause).splitlines()[0]}") from None
        try:
            return datasets.load_dataset(source, split=split, cache_dir=str(cache_dir))
        except Exception as exc:  # noqa: BLE001 - hub unreachable, no such dataset, no such split
            raise DSEEError(
                f"data source '{source}' is neither a local file or directory nor a loadable hub dataset "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
