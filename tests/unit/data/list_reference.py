"""The list-based data path this project had before its data layer moved to `datasets` (kept as a reference:
the Arrow path must give the same tokens, so the same losses, on the same data): files read into Python
lists, tokenised one example at a time."""

import csv
import json
import math
from pathlib import Path

IGNORE_INDEX = -100
HELD_OUT_FRACTION = 0.05


def read_e2e(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [(r["mr"], r["ref"]) for r in csv.DictReader(f) if r["mr"] and r["ref"]]


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(str(obj["prompt"]), str(obj["completion"])) for obj in lines]


def tokenize_pairs(pairs, tokenizer, block_size):
    out = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = (p + c)[:block_size], ([IGNORE_INDEX] * len(p) + c)[:block_size]
        if any(x != IGNORE_INDEX for x in labels[1:]):
            out.append((ids, labels))
    return out


def pack_text(text, tokenizer, block_size):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // block_size
    return [(ids[i * block_size : (i + 1) * block_size],) * 2 for i in range(n)]


def hold_out_mrs(pairs, fraction):
    mrs = list(dict.fromkeys(mr for mr, _ in pairs))
    counts = {mr: sum(1 for m, _ in pairs if m == mr) for mr in mrs}
    held, n_held = set(), 0
    for mr in reversed(mrs):
        if held and n_held >= fraction * len(pairs):
            break
        held.add(mr)
        n_held += counts[mr]
    return [p for p in pairs if p[0] not in held], [p for p in pairs if p[0] in held]


def splits(fmt: str, tokenizer, block_size: int, train: Path, evals: Path | None = None):
    """(train, eval) lists of (input ids, labels), as the list-based path built them."""

    def tokenize(pairs):
        if fmt == "e2e":
            pairs = [(mr + " ||", " " + ref) for mr, ref in pairs]
        return tokenize_pairs(pairs, tokenizer, block_size)

    read = read_jsonl if fmt == "jsonl" else read_e2e
    if fmt == "text":
        tr = pack_text(train.read_text(encoding="utf-8"), tokenizer, block_size)
        ev = pack_text(evals.read_text(encoding="utf-8"), tokenizer, block_size) if evals else None
    elif evals:
        tr, ev = tokenize(read(train)), tokenize(read(evals))
    elif fmt == "e2e":
        tr_pairs, ev_pairs = hold_out_mrs(read(train), HELD_OUT_FRACTION)
        tr, ev = tokenize(tr_pairs), tokenize(ev_pairs)
    else:
        tr, ev = tokenize(read(train)), None
    if ev is None:
        n_eval = max(1, math.ceil(HELD_OUT_FRACTION * len(tr)))
        tr, ev = tr[:-n_eval], tr[-n_eval:]
    return tr, ev
