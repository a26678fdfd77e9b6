"""Median optimizer-step time: full fine-tuning vs PEFT LoRA vs DSEE, ZeRO-2 and ZeRO-3, 2 ranks, one run.

    python bench/step_time.py [--ranks 2] [--n-layer 4 --n-embd 512 --seq 128 --micro-batch 4] [--rank 8]

Every (method, stage) pair is a separate `deepspeed --num_gpus N` job on the same GPT-2 configuration
(random init; the step time does not depend on the weights), the same DeepSpeed JSON
(configs/ds/zero{2,3}_fp32.json or bf16 with --bf16) and the same batch. One step = forward +
backward + optimizer step, measured between barriers after warm-up.

- full: every parameter trainable.
- lora: PEFT LoRA on GPT-2's fused `c_attn` with rank r (PEFT adapts the fused matrix as one; it
  cannot select the q and v thirds of a Conv1D).
- dsee: DSEE on the q and v slices of every `c_attn`, rank r each, N sparse values per slice.

Last line: JSON with `dsee_over_lora` and `dsee_over_full` for ZeRO-2 at the top level and the same
figures per stage under `per_stage`.
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
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--n-layer", default="4")
    p.add_argument("--n-embd", default="512")
    p.add_argument("--seq", default="128")
    p.add_argument("--micro-batch", default="4")
    p.add_argument("--rank", default="8")
    p.add_argument("--num-sparse", default="64")
    p.add_argument("--steps", default="10")
    p.add_argument("--repeats", type=int, default=2,
                   help="launches per method, in alternating order (full lora dsee, dsee lora full, ...); "
                        "each method keeps its lowest median, which removes most launch-to-launch drift on shared CPUs")
    args = p.parse_args()
    per_stage = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            ds = ROOT / "configs" / "ds" / f"zero{stage}_{'bf16' if args.bf16 else 'fp32'}.json"
            times = {}
            order = [m for r in range(args.repeats) for m in (("full", "lora", "dsee") if r % 2 == 0 else ("dsee", "lora", "full"))]
            for launch, method in enumerate(order):
                result = Path(tmp) / f"{stage}_{method}_{launch}.json"
                worker_args = ["--method", method, "--ds-config", str(ds), "--result", str(result),
                               "--n-layer", args.n_layer, "--n-embd", args.n_embd, "--seq", args.seq,
                               "--micro-batch", args.micro_batch, "--rank", args.rank, "--num-sparse", args.num_sparse,
                               "--steps", args.steps]
                for _attempt in range(2):  # gloo teardown rarely aborts a finished job at exit; retry once
                    proc = run_worker("_step_worker.py", args.ranks, *worker_args)
                    if proc.returncode == 0 and result.is_file():
                        break
                if proc.returncode != 0 or not result.is_file():
                    sys.exit(f"bench/step_time.py: {method} under ZeRO-{stage} failed:\n{proc.stderr[-3000:]}")
                measured = json.loads(result.read_text())
                print(f"ZeRO-{stage} {method:5s}: median step {measured['median_step_s'] * 1000:8.1f} ms  "
                      f"trainable {measured['trainable']:,}", flush=True)
                if method not in times or measured["median_step_s"] < times[method]["median_step_s"]:
                    times[method] = measured
            per_stage[f"zero{stage}"] = {
                "dsee_over_lora": round(times["dsee"]["median_step_s"] / times["lora"]["median_step_s"], 3),
                "dsee_over_full": round(times["dsee"]["median_step_s"] / times["full"]["median_step_s"], 3),
                "lora_over_full": round(times["lora"]["median_step_s"] / times["full"]["median_step_s"], 3),
                "median_step_s": {m: round(t["median_step_s"], 5) for m, t in times.items()},
            }
            print(f"ZeRO-{stage}: dsee/lora {per_stage[f'zero{stage}']['dsee_over_lora']}, "
                  f"dsee/full {per_stage[f'zero{stage}']['dsee_over_full']}, "
                  f"lora/full {per_stage[f'zero{stage}']['lora_over_full']}", flush=True)
    top = per_stage.get("zero2") or next(iter(per_stage.values()))
    print(json.dumps({"dsee_over_lora": top["dsee_over_lora"], "dsee_over_full": top["dsee_over_full"],
                      "ranks": args.ranks, "bf16": args.bf16, "per_stage": per_stage}))


if __name__ == "__main__":
    main()
