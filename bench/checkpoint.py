"""Checkpoint size and speed: DSEE vs full fine-tuning on the same model, through dsee_dist's real save path.

    python bench/checkpoint.py [--stage 2] [--ranks 2] [--n-layer 24 --n-embd 1024]   # GPT-2-medium shapes

For each method: one optimizer step (so the optimizer state exists), then `dsee_dist.checkpoint.save_checkpoint`
(DeepSpeed's sharded save + RNG states + manifest with checksums + atomic rename) and DeepSpeed's load, timed
between barriers. "Trainable state" = working weights + fp32 master copy + both Adam moments of the trainable
parameters; DSEE's support indices are counted beside it. Random initialisation (sizes do not depend on values).

Last line: JSON with `dsee_bytes_over_state` (checkpoint bytes / (trainable state + indices)),
`save_time_ratio` (DSEE save time / full save time), `load_time_ratio`, and per-method figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import ROOT, worker_result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="2")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--n-layer", default="24")
    p.add_argument("--n-embd", default="1024")
    p.add_argument("--n-head", default="16")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    return p.parse_args()


def measure(args, method: str, out: Path) -> dict:
    """One launch of bench/_checkpoint_worker.py: its figures, with bytes_over_state, and their line printed."""
    ds = ROOT / "configs" / "ds" / f"zero{args.stage}_fp32.json"
    shape = ["--n-layer", args.n_layer, "--n-embd", args.n_embd, "--n-head", args.n_head]
    worker_args = ["--method", method, "--ds-config", ds, "--out", out, *shape]
    r = worker_result(
        "_checkpoint_worker.py", args.ranks, worker_args, out / "result.json", f"bench/checkpoint.py: {method} failed"
    )
    r["bytes_over_state"] = r["checkpoint_bytes"] / (r["trainable_state_bytes"] + r["index_bytes"])
    print(
        f"{method:5s}: {r['trainable_params']:>12,} trainable  "
        f"checkpoint {r['checkpoint_bytes'] / 2**20:10.1f} MiB  "
        f"({r['bytes_over_state']:.3f}x trainable state + indices)  "
        f"save {r['save_s']:7.3f}s  load {r['load_s']:7.3f}s",
        flush=True,
    )
    return r


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {method: measure(args, method, Path(tmp) / method) for method in ("dsee", "full")}
    summary = {
        "dsee_bytes_over_state": round(results["dsee"]["bytes_over_state"], 4),
        "save_time_ratio": round(results["dsee"]["save_s"] / results["full"]["save_s"], 4),
        "load_time_ratio": round(results["dsee"]["load_s"] / results["full"]["load_s"], 4),
        "stage": int(args.stage),
        "ranks": args.ranks,
        "shape": [int(args.n_layer), int(args.n_embd)],
        "per_method": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
