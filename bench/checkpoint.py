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
import sys
import tempfile
from pathlib import Path

from _launch import ROOT, run_worker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="2")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--n-layer", default="24")
    p.add_argument("--n-embd", default="1024")
    p.add_argument("--n-head", default="16")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for method in ("dsee", "full"):
            out = Path(tmp) / method
            proc = run_worker(
                "_checkpoint_worker.py",
                args.ranks,
                "--method",
                method,
                "--ds-config",
                str(ROOT / "configs" / "ds" / f"zero{args.stage}_fp32.json"),
                "--out",
                str(out),
                "--n-layer",
                args.n_layer,
                "--n-embd",
                args.n_embd,
                "--n-head",
                args.n_head,
            )
            if proc.returncode != 0 or not (out / "result.json").is_file():
                sys.exit(f"bench/checkpoint.py: {method} failed:\n{proc.stderr[-3000:]}")
            r = json.loads((out / "result.json").read_text())
            r["bytes_over_state"] = r["checkpoint_bytes"] / (r["trainable_state_bytes"] + r["index_bytes"])
            results[method] = r
            print(
                f"{method:5s}: {r['trainable_params']:>12,} trainable  "
                f"checkpoint {r['checkpoint_bytes'] / 2**20:10.1f} MiB  "
                f"({r['bytes_over_state']:.3f}x trainable state + indices)  "
                f"save {r['save_s']:7.3f}s  load {r['load_s']:7.3f}s",
                flush=True,
            )
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
