"""Reading references and system outputs: E2E's, in the formats the official E2E scorer accepts, and free text.

E2E references: a CSV/TSV with an MR column and a reference column (E2E's `mr,ref`; grouped by MR, the
groups in order of each MR's first appearance), or a text file with one reference per line and the
groups of one MR separated by a blank line (a text file without blank lines holds one reference per
MR). Free-text references (any task): JSONL, one input per line (`read_text_references`). Outputs: a text
file, one line per input, in the same order; an empty line is an empty output.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from dsee_dist.errors import DSEEError

# column names the official scorer recognises (measure_scores.py), plus E2E's own
MR_COLUMN = re.compile(r"(mr|src|source|meaning(?:[_ .-]rep(?:resentation)?)?|da|dial(?:ogue)?[_ .-]act)s?", re.I)
REF_COLUMN = re.compile(r"(trg|tgt|target|ref(?:erence)?|human(?:[_ .-](?:ref(?:erence)?))?)s?", re.I)


@dataclass
class References:
    """Reference groups, one per MR; `mrs` is None for a text file (no MRs in it)."""

    groups: list[list[str]]
    mrs: list[str] | None
    path: Path

    @property
    def num_references(self) -> int:
        return sum(len(g) for g in self.groups)


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DSEEError(f"{what} file '{path}' does not exist")
    if not path.is_file():
        raise DSEEError(f"{what} path '{path}' is not a file")


def is_table(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tsv")


def read_mr_table(path: Path, require_refs: bool = True) -> list[tuple[str, str]]:
    """(mr, reference) rows of a CSV/TSV with a header naming an MR and a reference column (without
    `require_refs`, a table of MRs alone gives empty references)."""
    _require_file(path, "references" if require_refs else "input")
    text = path.read_text(encoding="utf-8-sig")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DSEEError(f"references file '{path}' is empty")
    delimiter = "\t" if "\t" in lines[0] else ","
    rows = list(csv.reader(lines, delimiter=delimiter))
    header = rows[0]
    mr_cols = [i for i, name in enumerate(header) if MR_COLUMN.fullmatch(name.strip())]
    ref_cols = [i for i, name in enumerate(header) if REF_COLUMN.fullmatch(name.strip())]
    if len(mr_cols) != 1 or len(ref_cols) > 1 or (require_refs and not ref_cols):
        wanted = "one MR column and one reference column (E2E's 'mr,ref')" if require_refs else "one MR column ('mr')"
        raise DSEEError(f"'{path}' needs a header with {wanted}; found {header}")
    mr_col, ref_col = mr_cols[0], (ref_cols[0] if ref_cols else None)
    out = []
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise DSEEError(f"{path}: row {lineno} has {len(row)} columns, the header has {len(header)}")
        out.append((row[mr_col].strip(), row[ref_col].strip() if ref_col is not None else ""))
    if not out:
        raise DSEEError(f"'{path}' has a header but no rows")
    return out


def group_by_mr(rows: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Distinct MRs in order of first appearance, and each one's references (empty ones dropped)."""
    groups: dict[str, list[str]] = {}
    for mr, ref in rows:
        groups.setdefault(mr, [])
        if ref:
            groups[mr].append(ref)
    return list(groups), list(groups.values())


def read_references(path: str | Path) -> References:
    path = Path(path)
    if is_table(path):
        mrs, groups = group_by_mr(read_mr_table(path))
        empty = [mr for mr, g in zip(mrs, groups) if not g]
        if empty:
            raise DSEEError(f"references file '{path}': MR '{empty[0]}' has no non-empty reference")
        return References(groups, mrs, path)
    _require_file(path, "references")
    groups: list[list[str]] = [[]]
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if not groups:
        raise DSEEError(f"references file '{path}' has no references")
    if len(groups) == 1:  # no blank line anywhere: one reference per MR (as the official scorer reads it)
        groups = [[ref] for ref in groups[0]]
    return References(groups, None, path)


def read_hypotheses(path: str | Path, num_mrs: int | None = None, refs_path: Path | None = None) -> list[str]:
    """One output per line (an empty line is an empty output: a valid, bad answer, scored as such); given
    `num_mrs`, refuses a different number of lines."""
    path = Path(path)
    _require_file(path, "outputs")
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    lines = [line.rstrip("\r").strip() for line in lines]
    if not lines:
        raise DSEEError(f"outputs file '{path}' is empty")
    if num_mrs is not None and len(lines) != num_mrs:
        where = f" in '{refs_path}'" if refs_path else ""
        raise DSEEError(
            f"outputs file '{path}' has {len(lines)} lines but there are {num_mrs} inputs{where}: "
            f"give one output line per input, in the inputs' order"
        )
    return lines


def last_assistant_split(messages: list[dict], where: str) -> tuple[list[dict], str]:
    """(the conversation before its last assistant turn, that turn's content): a chat row as a generation input
    and its reference. `messages` are normalised ({role, content}, data/chat.py)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise DSEEError(f"{where}: needs a user turn before its last assistant turn (the reference)")
    return messages[:last], messages[last]["content"]


def read_text_references(path: str | Path) -> References:
    """Free-text references from JSONL, one input per line: `references` (a list), `reference`, `output`
    (alpaca), `completion`, or `messages` / `conversations` (the last assistant turn)."""
    from dsee_dist.data.chat import normalize_messages

    path = Path(path)
    _require_file(path, "references")
    groups = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DSEEError(f"{where}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DSEEError(f"{where}: not a JSON object")
        if isinstance(row.get("references"), list):
            refs = [str(r) for r in row["references"]]
        elif any(k in row for k in ("reference", "output", "completion")):
            refs = [str(next(row[k] for k in ("reference", "output", "completion") if k in row))]
        elif "messages" in row or "conversations" in row:
            messages = normalize_messages(row.get("messages", row.get("conversations")), where)
            refs = [last_assistant_split(messages, where)[1]]
        else:
            raise DSEEError(
                f"{where}: no reference; give 'references' (a list), 'reference', 'output', 'completion' or "
                "'messages' (the last assistant turn is the reference)"
            )
        refs = [r.strip() for r in refs if r.strip()]
        if not refs:
            raise DSEEError(f"{where}: the reference is empty")
        groups.append(refs)
    if not groups:
        raise DSEEError(f"references file '{path}' has no references")
    return References(groups, None, path)
