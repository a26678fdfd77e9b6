"""Median optimizer-step time: full fine-tuning vs PEFT LoRA vs DSEE (and PEFT's Supra and SHiRA), ZeRO-2 and
ZeRO-3, one run.

    python bench/step_time.py [--family gpt2|llama] [--device auto|cpu|gpu] [--ranks N] [--n-layer 4 --n-embd 512
                              --seq 128 --micro-batch 4] [--rank 8] [--methods full,lora,dsee] [--model DIR]
                              [--threads T] [--out JSON]

SmolLM2-135M, the four adapters side by side (fp32 CPU; docs/benchmarks.md "DSEE vs PEFT's sparse adapters"):

    python bench/step_time.py --device cpu --model /tmp/models-smollm2/smollm2-135m --methods lora,dsee,supra,shira \
        --stages 2 --ranks 1 --threads 1 --seq 64 --micro-batch 8 --rank 8 --num-sparse 384 --repeats 3 --steps 4

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

- supra: PEFT's Supertuning with r set (LoRA r plus single entries at the largest |W|, as many in total as DSEE's
  N per matrix: recipes/methods.supra_budget); shira: PEFT's SHiRA (LoRA's count on a random mask). Both built by
  recipes/methods.py as the trainer builds them; nn.Linear only (Llama, or a --model such as SmolLM2-135M).
--model DIR: a local Hugging Face model instead of the random one (its own shape; --family is taken from it).

Every launch also reports memory per rank (the highest rank counts): peak RSS of the process, the peak RSS of the
measured steps (reset before the first step) and what the steps add above the built engine's RSS; on a GPU,
torch.cuda.max_memory_allocated. With lora among --methods, `over_lora` gives, per method, the median over the
repeats of its step time and memory divided by lora's in the same repeat (methods run one after another in an
order alternating per repeat), with the range over the repeats. The CPU has no allocator peak in torch; RSS stands
for it.

Last line: JSON with `dsee_over_lora` and `dsee_over_full` for ZeRO-2 at the top level (where those methods ran)
and the same figures per stage under `per_stage`; --out also writes it with the date, commit, versions and device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import ROOT, alternating, device_kind, keep_lowest, spread, worker_result, write_result

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


def launch_memory(measured: dict) -> dict:
    """A launch's memory figures, the highest rank's (None where not measured)."""
    out = {}
    for key in ("peak_rss_bytes", "steps_peak_rss_bytes", "steps_added_rss_bytes", "peak_gpu_bytes"):
        values = [r.get(key) for r in measured["per_rank"] if r.get(key) is not None]
        out[key] = max(values) if values else None
    out["threads"] = measured["per_rank"][0].get("threads")
    return out


def over_lora(launches: list[dict], methods: list[str]) -> dict:
    """Per method: the median, min and max over repeats of (its figure / lora's in the same repeat), for the step
    time and each memory figure."""
    figures = {
        "step_time": "median_step_s",
        "peak_rss": "peak_rss_bytes",
        "steps_peak_rss": "steps_peak_rss_bytes",
        "steps_added_rss": "steps_added_rss_bytes",
        "peak_gpu": "peak_gpu_bytes",
    }
    by_repeat: dict[int, dict[str, dict]] = {}
    for launch in launches:
        by_repeat.setdefault(launch["repeat"], {})[launch["method"]] = launch
    out = {}
    for method in methods:
        ratios = {}
        for name, key in figures.items():
            values = [
                runs[method][key] / runs["lora"][key]
                for runs in by_repeat.values()
                if method in runs and "lora" in runs and runs[method].get(key) and runs["lora"].get(key)
            ]
            if values:
                ratios[name] = spread(values)
        out[method] = ratios
    return out


def strip(per_stage: dict) -> dict:
    """The per-stage results without the per-launch detail (kept for --out)."""
    return {stage: {k: v for k, v in r.items() if k != "launches"} for stage, r in per_stage.items()}


def parse_args() -> argparse.Namespace:
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
    p.add_argument("--methods", default="full,lora,dsee", help="any of full, lora, dsee, supra, shira")
    p.add_argument("--model", default=None, help="a local Hugging Face directory instead of the random model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank; 0 = cores / ranks")
    p.add_argument("--out", default=None, help="also write the JSON (with date, commit, versions) here")
    p.add_argument("--steps", default="10")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="launches per method, in alternating order (full lora dsee, dsee lora full, ...); "
        "each method keeps its lowest median, which removes most launch-to-launch drift on shared CPUs; "
        "over_lora takes the median of the per-repeat ratios",
    )
    return p.parse_args()


def checked_methods(args) -> list[str]:
    """--methods as a list, after checking each against the family (taken from --model where given)."""
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - {"full", "lora", "dsee", "supra", "shira"}:
        sys.exit(f"bench/step_time.py: --methods takes full, lora, dsee, supra and shira, not {args.methods!r}")
    if args.model:  # the family is the model's own (the worker takes it from there as well)
        model_type = json.loads((Path(args.model) / "config.json").read_text()).get("model_type")
        args.family = "gpt2" if model_type == "gpt2" else "llama"
    if args.family == "gpt2" and not args.model and {"supra", "shira"} & set(methods):
        sys.exit("bench/step_time.py: supra and shira adapt nn.Linear only, not GPT-2's Conv1D; use --family llama")
    return methods


def worker_args(args, method: str, ds: Path, result: Path) -> list:
    """bench/_step_worker.py's command line for one launch."""
    shape = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_kv_head or 0)
    shape.update(intermediate=args.intermediate or 0, vocab=args.vocab, seq=args.seq, micro_batch=args.micro_batch)
    shape.update(rank=args.rank, num_sparse=args.num_sparse, steps=args.steps, threads=args.threads)
    out = ["--method", method, "--family", args.family, "--ds-config", ds, "--result", result]
    for key, value in shape.items():
        out += [f"--{key.replace('_', '-')}", value]
    return out + (["--model", args.model] if args.model else [])


def measure_stage(args, stage: str, methods: list[str], tmp: Path) -> tuple[dict, list[dict]]:
    """(each method's launch with the lowest median step, every launch) of one ZeRO stage, methods alternating."""
    ds = ROOT / "configs" / "ds" / f"zero{stage}_{'bf16' if args.bf16 else 'fp32'}.json"
    best, launches = {}, []
    for launch, (repeat, method) in enumerate(alternating(methods, args.repeats)):
        result = Path(tmp) / f"{stage}_{method}_{launch}.json"
        failure = f"bench/step_time.py: {method} under ZeRO-{stage} failed"
        # one retry, for a launch that fails for a passing reason (the workers' own exit is _common.end_rank's)
        measured = worker_result(
            "_step_worker.py", args.ranks, worker_args(args, method, ds, result), result, failure, 2
        )
        memory = launch_memory(measured)
        print(
            f"ZeRO-{stage} {method:5s}: median step {measured['median_step_s'] * 1000:8.1f} ms  "
            f"{measured['tokens_per_s']:9.0f} tokens/s  p90/median {measured['p90_over_median']:.2f}  "
            f"trainable {measured['trainable']:,}  peak RSS {memory['peak_rss_bytes'] / 2**20:,.0f} MiB",
            flush=True,
        )
        launches.append({"repeat": repeat, "method": method, **measured, **memory})
        keep_lowest(best, method, measured)
    return best, launches


def stage_summary(stage: str, best: dict, launches: list[dict], methods: list[str]) -> dict:
    """One stage's ratios, medians, trainable counts, over_lora and launches; its lines printed."""
    out = {}
    for a, b in (("dsee", "lora"), ("dsee", "full"), ("lora", "full")):
        if a in best and b in best:
            out[f"{a}_over_{b}"] = round(best[a]["median_step_s"] / best[b]["median_step_s"], 3)
    out["median_step_s"] = {m: round(t["median_step_s"], 5) for m, t in best.items()}
    out["trainable"] = {m: t["trainable"] for m, t in best.items()}
    if "lora" in best:
        out["over_lora"] = over_lora(launches, methods)
    out["launches"] = [{k: v for k, v in x.items() if k != "per_rank"} for x in launches]
    pairs = ", ".join(
        f"{k.replace('_over_', '/')} {v}" for k, v in out.items() if k.endswith(("_over_lora", "_over_full"))
    )
    print(f"ZeRO-{stage}: {pairs}", flush=True)
    for method, ratios in out.get("over_lora", {}).items():
        print(
            f"ZeRO-{stage} {method:5s} / lora: "
            + ", ".join(f"{k} {v['median']} [{v['min']}-{v['max']}]" for k, v in ratios.items()),
            flush=True,
        )
    return out


def main() -> None:
    args = parse_args()
    args.device = device_kind(
        args.device, "step_time.py", f"the GPU step-time benchmark ({args.family}, bf16)", family=args.family
    )
    if args.device is None:
        return
    resolve_defaults(args)
    methods = checked_methods(args)
    per_stage = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            best, launches = measure_stage(args, stage, methods, Path(tmp))
            per_stage[f"zero{stage}"] = stage_summary(stage, best, launches, methods)
    top = per_stage.get("zero2") or next(iter(per_stage.values()))
    result = {
        **{k: top[k] for k in ("dsee_over_lora", "dsee_over_full") if k in top},
        "family": args.family,
        "device": args.device,
        "ranks": args.ranks,
        "bf16": args.bf16,
        "per_stage": per_stage,
    }
    if args.model:
        result["model"] = args.model
    if args.out:
        run = dict(methods=methods, seq=args.seq, micro_batch=args.micro_batch, rank=args.rank)
        run.update(num_sparse=args.num_sparse, steps=args.steps, repeats=args.repeats)
        write_result(args.out, {**result, **run, "threads_per_rank": top["launches"][0].get("threads")}, args.device)
    print(json.dumps({k: v for k, v in result.items() if k != "per_stage"} | {"per_stage": strip(per_stage)}))


if __name__ == "__main__":
    main()
