"""Test-only bench worker: join the process group (gloo on CPU, as the bench workers do), run a few collectives,
write this rank's marker file, then end through the bench workers' exit path (bench/_common.end_rank). An atexit
hook would write `teardown<rank>`: the exit path skips interpreter teardown, so it never runs.

    deepspeed --num_gpus 2 tests/bench/exit_worker.py --out DIR
"""

import argparse
import atexit
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _common import end_rank  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    from dsee_dist.engine import process_group

    info = process_group.init_distributed()
    total = process_group.all_reduce_sum([info.rank + 1])[0]
    process_group.barrier()
    Path(args.out, f"rank{info.rank}").write_text(f"{int(total)}\n")
    atexit.register(Path(args.out, f"teardown{info.rank}").write_text, "interpreter teardown ran\n")


if __name__ == "__main__":
    main()
    end_rank(0)
