"""Median optimizer-step time: full fine-tuning vs PEFT LoRA vs DSEE, ZeRO-2 and ZeRO-3, one run.

    python bench/step_time.py [--family gpt2|llama] [--device auto|cpu|gpu] [--ranks N] [--n-layer 4 --n-embd 512
                              --seq 128 --micro-batch 4] [--rank 8]

Shapes by device (any of them can be overridden):
- cpu (2 ranks, fp32): GPT-2 4 x 512, 8 heads; Llama 4 x 512, 8 heads, 2 KV heads, MLP 1408; seq 128,
  micro-batch 4, r 8.
- gpu (1 rank, bf16): GPT-2-medium 24 x 1024, 16 heads; TinyLlama-1.1B 22 x 2048, 32 heads, 4 KV heads, MLP 5632,
  vocabulary 32000; seq 512, micro-batch 8, r 16. Without a CUDA GPU, `--device gpu` prints one line saying it
  was skipped.

Every (method, stage) pair is a separate `deepspeed --num_gpus N` job on the same GPT-2 configuration
(random init; the step time does not depend on the weights), the same DeepSpeed JSON
(configs/ds/zero{2,3}_fp32.json or bf16 with --bf16) and the same batch. One step = forward +
backward + optimizer step, measured between barriers after warm-up.

- full: every parameter trainable.
- lora: PEFT LoRA with rank r on GPT-2's fused `c_attn` (PEFT adapts the fused matrix as one; it cannot select
  the q and v thirds of a Conv1D), or on Llama's `q_proj` and `v_proj`.
- dsee: DSEE on the q and v slices of every `c_attn` (GPT-2) or on `q_proj` and `v_proj` (Llama), rank r each,
  N sparse values per matrix.

Last line: JSON with `dsee_over_lora` and `dsee_over_full` for ZeRO-2 at the top level and the same
figures per stage under `per_stage`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _launch import ROOT, device_kind, run_worker

# Defaults per (family, device): the shapes of the module docstring.
SHAPES = {
    ("gpt2", "cpu"): dict(n_layer=4, n_embd=512, n_head=8, vocab=2048),
    ("llama", "cpu"): dict(n_layer=4, n_embd=512, n_head=8, n_kv_head=2, intermediate=1408, vocab=2048),
    ("gpt2", "gpu"): dict(n_layer=24, n_embd=1024, n_head=16, vocab=50257),
    ("llama", "gpu"): dict(n_layer=22, n_embd=2048, n_head=32, n_kv_head=4, intermediate=5632, vocab=32000),
}
RUN = {
    "cpu": dict(ranks=2, seq=128, micro_batch=4, rank=8, bf16=False),
    "gpu": dict(ranks=1, seq=512, micro_batch=8, rank=16, bf16=True),
}


def resolve_defaults(args) -> None:
    """Fill every unset option from the shape and run settings of (family, device)."""
    for key, value in {**SHAPES[(args.family, args.device)], **RUN[args.device]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="auto = gpu where CUDA is available; picks the default shapes and precision",
    )
    p.add_argument("--ranks", type=int, default=None)
    p.add_argument("--bf16", action="store_true", default=None)
    p.add_argument("--stages", default="2,3")
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--n-kv-head", type=int, default=None, help="Llama: key/value heads (GQA)")
    p.add_argument("--intermediate", type=int, default=None, help="Llama: MLP width")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--num-sparse", default="64")
    p.add_argument("--steps", default="10")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="launches per method, in alternating order (full lora dsee, dsee lora full, ...); "
        "each method keeps its lowest median, which removes most launch-to-launch drift on shared CPUs",
    )
    args = p.parse_args()
    args.device = device_kind(
        args.device, "step_time.py", f"the GPU step-time benchmark ({args.family}, bf16)", family=args.family
    )
    if args.device is None:
        return
    resolve_defaults(args)
    per_stage = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            ds = ROOT / "configs" / "ds" / f"zero{stage}_{'bf16' if args.bf16 else 'fp32'}.json"
            times = {}
            order = [
                m
                for r in range(args.repeats)
                for m in (("full", "lora", "dsee") if r % 2 == 0 else ("dsee", "lora", "full"))
            ]
            for launch, method in enumerate(order):
                result = Path(tmp) / f"{stage}_{method}_{launch}.json"
                worker_args = [
                    "--method",
                    method,
                    "--family",
                    args.family,
                    "--ds-config",
                    str(ds),
                    "--result",
                    str(result),
                    "--n-layer",
                    args.n_layer,
                    "--n-embd",
                    args.n_embd,
                    "--n-head",
                    args.n_head,
                    "--n-kv-head",
                    args.n_kv_head or 0,
                    "--intermediate",
                    args.intermediate or 0,
                    "--vocab",
                    args.vocab,
                    "--seq",
                    args.seq,
                    "--micro-batch",
                    args.micro_batch,
                    "--rank",
                    args.rank,
                    "--num-sparse",
                    args.num_sparse,
                    "--steps",
                    args.steps,
                ]
                worker_args = [str(a) for a in worker_args]
                for _attempt in range(2):  # gloo teardown rarely aborts a finished job at exit; retry once
                    proc = run_worker("_step_worker.py", args.ranks, *worker_args)
                    if proc.returncode == 0 and result.is_file():
                        break
                if proc.returncode != 0 or not result.is_file():
                    sys.exit(f"bench/step_time.py: {method} under ZeRO-{stage} failed:\n{proc.stderr[-3000:]}")
                measured = json.loads(result.read_text())
                print(
                    f"ZeRO-{stage} {method:5s}: median step {measured['median_step_s'] * 1000:8.1f} ms  "
                    f"{measured['tokens_per_s']:9.0f} tokens/s  p90/median {measured['p90_over_median']:.2f}  "
                    f"trainable {measured['trainable']:,}",
                    flush=True,
                )
                if method not in times or measured["median_step_s"] < times[method]["median_step_s"]:
                    times[method] = measured
            per_stage[f"zero{stage}"] = {
                "dsee_over_lora": round(times["dsee"]["median_step_s"] / times["lora"]["median_step_s"], 3),
                "dsee_over_full": round(times["dsee"]["median_step_s"] / times["full"]["median_step_s"], 3),
                "lora_over_full": round(times["lora"]["median_step_s"] / times["full"]["median_step_s"], 3),
                "median_step_s": {m: round(t["median_step_s"], 5) for m, t in times.items()},
            }
            print(
                f"ZeRO-{stage}: dsee/lora {per_stage[f'zero{stage}']['dsee_over_lora']}, "
                f"dsee/full {per_stage[f'zero{stage}']['dsee_over_full']}, "
                f"lora/full {per_stage[f'zero{stage}']['lora_over_full']}",
                flush=True,
            )
    top = per_stage.get("zero2") or next(iter(per_stage.values()))
    print(
        json.dumps(
            {
                "dsee_over_lora": top["dsee_over_lora"],
                "dsee_over_full": top["dsee_over_full"],
                "family": args.family,
                "device": args.device,
                "ranks": args.ranks,
                "bf16": args.bf16,
                "per_stage": per_stage,
            }
        )
    )


if __name__ == "__main__":
    main()
