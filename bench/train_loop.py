"""The training loop itself against a plain PyTorch + PEFT LoRA loop on the same model and batch shape, one run.

    python bench/train_loop.py [--device auto|cpu|gpu] [--model DIR] [--steps 30 --warmup 5]
                               [--micro-batch 16 --seq 64] [--rank 8] [--methods lora,dsee,supra,shira]
                               [--threads T] [--out JSON]

- trainer: `python -m dsee_dist.train` as a user runs it (1 process, ZeRO-2 DeepSpeed engine, the recipe's
  loss, prefetch and logging), once per method: `lora` (PEFT's LoRA layers on q_proj/v_proj, r) and `dsee`
  (DSEE on the same matrices, r + N sparse, magnitude support so setup stays short), `supra` (PEFT's Supertuning:
  r plus as many sparse entries as dsee's N per matrix in total) and `shira` (PEFT's SHiRA, LoRA's count), the
  last two as recipes/methods.py builds them. Logged every step (train.log_every_n_steps=1), so metrics.jsonl
  holds each step's wall time. Each trainer run's peak RSS is read from the kernel when it exits (wait4).
- plain: the smallest loop that trains the same thing: transformers' model with PEFT LoRA, torch AdamW,
  `model(input_ids, labels)`, backward, step, zero_grad, a device sync per step to time it.

Both read fixed-length blocks (data.format=text, block = --seq tokens, no padding) of the same generated text
with the same tokenizer, micro-batch --micro-batch, no gradient accumulation; the first --warmup steps are not
counted. Every loop runs --repeats times in alternating order and keeps its lowest median. The model is --model
(a local Hugging Face directory, e.g. SmolLM2-135M) or a randomly initialised Llama of the device's shape (the
step time does not depend on the weights) with a locally trained 512-token tokenizer (the embedding keeps the
shape's vocabulary; --layers and --hidden shrink it):
- cpu (fp32): Llama 4 x 512, 8 heads, 2 KV heads, MLP 1408, vocabulary 2048; micro-batch 4 x 64 tokens.
- gpu (bf16): TinyLlama-1.1B, 22 x 2048, 32 heads, 4 KV heads, MLP 5632, vocabulary 32000; micro-batch 16 x 64.
Without a CUDA GPU, `--device gpu` prints one line saying it was skipped.

Last line: JSON with `median_step_s` and `p90_over_median` per loop and `trainer_over_plain` per method (the
trainer's median step over the plain loop's). With lora among --methods, `over_lora` adds, per method, the median
(and range) over the repeats of its trainer's median step and peak RSS divided by lora's trainer's in the same
repeat. --threads sets OMP_NUM_THREADS for the trainer and torch's threads for the plain loop (1 keeps a shared
machine's timings usable); --out writes the JSON with the date, commit, versions and device.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import (  # noqa: E402
    alternating,
    device_kind,
    keep_lowest,
    quantile,
    run_with_usage,
    spread,
    write_result,
)
from step_time import SHAPES as STEP_TIME_SHAPES  # noqa: E402

from dsee_dist.engine.launcher import free_port  # noqa: E402

# step_time.py's Llama shapes (TinyLlama-1.1B on GPU, a small one on CPU) in LlamaConfig's key names
LLAMA_KEYS = dict(
    n_layer="num_hidden_layers",
    n_embd="hidden_size",
    n_head="num_attention_heads",
    n_kv_head="num_key_value_heads",
    intermediate="intermediate_size",
    vocab="vocab_size",
)
SHAPES = {
    device: {LLAMA_KEYS[k]: v for k, v in STEP_TIME_SHAPES[("llama", device)].items()} for device in ("cpu", "gpu")
}
MICRO_BATCH = {"cpu": 4, "gpu": 16}
LR = 1e-4  # the step time does not depend on it; small, so the random model's loss stays finite


def summary(times: list[float]) -> dict:
    median = statistics.median(times)
    return {
        "steps": len(times),
        "median_step_s": round(median, 5),
        "p90_over_median": round(quantile(times, 0.9) / median, 3),
    }


def write_text(path: Path, words: int, seed: int = 0) -> None:
    """Generated prose-like text (a fixed vocabulary of made-up words): the token ids, not their meaning, matter."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ter", "un", "sa", "vo", "ri", "en", "dal", "po", "xi"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    lines = [" ".join(rng.choice(lexicon) for _ in range(12)) + "." for _ in range(words // 12)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def random_llama_dir(target: Path, shape: dict, text: Path) -> Path:
    """A randomly initialised Llama of `shape` with a 512-token tokenizer trained on `text`, as an HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsee_dist.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(text.read_text(encoding="utf-8").splitlines(), 512)
    config = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def trainer_steps(method: str, model_dir: Path, text: Path, out_dir: Path, args) -> tuple[list[float], int]:
    """(per-step wall times after the warm-up steps, peak RSS in bytes) of `python -m dsee_dist.train`, one
    process."""
    config = {
        "method": method,
        "model": {"path": str(model_dir), "dropout": 0.0},
        "data": {"format": "text", "train_path": str(text), "block_size": args.seq, "max_eval_examples": 4},
        "dsee": {
            "lora_rank": args.rank,
            "lora_alpha": 2 * args.rank,
            "num_sparse": args.num_sparse,
            "support": "magnitude",
            "target_modules": ["q_proj", "v_proj"],
        },
        "train": {
            "lr": LR,
            "warmup_steps": 0,
            "schedule": "constant",
            "max_steps": args.warmup + args.steps,
            "micro_batch_size": args.micro_batch,
            "grad_accum_steps": 1,
            "log_every_n_steps": 1,
        },
        "eval": {"every_n_steps": 0, "micro_batch_size": args.micro_batch},
        "output": {"dir": str(out_dir)},
        "deepspeed": {
            "config": str(ROOT / "configs" / "ds" / f"zero2_{'bf16' if args.device == 'gpu' else 'fp32'}.json")
        },
    }
    config_path = out_dir.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log = out_dir.with_suffix(".log")
    returncode, usage = run_with_usage(
        [sys.executable, "-m", "dsee_dist.train", "--config", str(config_path)], env, log
    )
    peak_rss = usage.ru_maxrss * 1024  # Linux: kilobytes
    if returncode != 0:
        sys.exit(f"bench/train_loop.py: the trainer ({method}) failed:\n{log.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "step_time_s" in row]
    padding = max(row["padding_fraction"] for row in steps)
    if padding > 0:
        sys.exit(f"bench/train_loop.py: the trainer's batches were padded ({padding:.1%}); expected fixed length")
    return [row["step_time_s"] for row in steps if row["step"] > args.warmup], peak_rss


def plain_steps(model_dir: Path, text: Path, args) -> list[float]:
    """Per-step wall times of a plain PEFT LoRA loop on blocks of the same text (after the warm-up steps)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    dtype = torch.bfloat16 if args.device == "gpu" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer(text.read_text(encoding="utf-8"))["input_ids"])
    blocks = ids[: len(ids) // args.seq * args.seq].view(-1, args.seq)
    total = args.warmup + args.steps
    if len(blocks) < total * args.micro_batch:
        sys.exit(f"bench/train_loop.py: the text has {len(blocks)} blocks, fewer than {total * args.micro_batch}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(total):
        batch = blocks[step * args.micro_batch : (step + 1) * args.micro_batch].to(device)
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the trainer runs next, in its own process, on the same GPU
    return times


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--model", type=Path, default=None, help="a local HF directory (default: random Llama of the shape)")
    p.add_argument("--steps", type=int, default=30, help="measured steps per loop")
    p.add_argument("--warmup", type=int, default=5, help="steps run before measuring")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-sparse", type=int, default=64)
    p.add_argument(
        "--methods",
        default="lora,dsee",
        help="trainer runs (lora, dsee, supra, shira, full), each against the plain loop",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads of every loop; 0 = torch's default")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON (with date, commit, versions) here")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of every loop, in alternating order; each keeps its lowest median (drift on shared machines)",
    )
    p.add_argument("--layers", type=int, default=None, help="random model: number of layers (default: the shape's)")
    p.add_argument("--hidden", type=int, default=None, help="random model: hidden size, MLP 2.75x (the shape's)")
    return p.parse_args()


def model_shape(args) -> dict:
    """The random model's LlamaConfig keys: the device's shape, with --layers and --hidden applied."""
    shape = dict(SHAPES[args.device])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.hidden:
        shape.update(hidden_size=args.hidden, intermediate_size=int(2.75 * args.hidden))
    return shape


def run_loops(args, methods: list[str], model_dir: Path, text: Path, tmp: Path) -> tuple[dict, list[dict]]:
    """(each loop's repeat with the lowest median, every repeat's figures per loop): the plain loop and each
    method's trainer, in alternating order, one line each."""
    loops: dict[str, dict] = {}
    per_repeat: list[dict[str, dict]] = [{} for _ in range(args.repeats)]
    for repeat, name in alternating(["plain", *methods], args.repeats):
        if name == "plain":
            measured = summary(plain_steps(model_dir, text, args))
        else:
            times, peak_rss = trainer_steps(name, model_dir, text, tmp / f"run_{name}_{repeat}", args)
            measured = {**summary(times), "peak_rss_bytes": peak_rss}
        per_repeat[repeat][name] = measured
        label = "plain PEFT loop" if name == "plain" else f"trainer ({name})"
        rss = f"  peak RSS {measured['peak_rss_bytes'] / 2**20:,.0f} MiB" if "peak_rss_bytes" in measured else ""
        print(
            f"{label:16s}: median step {measured['median_step_s'] * 1000:8.1f} ms  "
            f"p90/median {measured['p90_over_median']:.2f}{rss}",
            flush=True,
        )
        keep_lowest(loops, name, measured)
    return loops, per_repeat


def main() -> None:
    args = parse_args()
    args.device = device_kind(args.device, "train_loop.py", "the GPU loop benchmark (TinyLlama-1.1B shape, bf16)")
    if args.device is None:
        return
    args.micro_batch = args.micro_batch or MICRO_BATCH[args.device]
    methods = [m for m in args.methods.split(",") if m]
    shape = model_shape(args)
    if not set(methods) <= {"lora", "dsee", "supra", "shira", "full"}:
        sys.exit(f"bench/train_loop.py: --methods takes lora, dsee, supra, shira and full, not {args.methods!r}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "train.txt"
        # Enough blocks for every step and the trainer's 5 % held-out tail, whatever the tokenizer's word length.
        write_text(text, words=max(4000, 8 * args.micro_batch * (args.warmup + args.steps) * args.seq // 2))
        model_dir = args.model or random_llama_dir(tmp / "model", shape, text)
        loops, per_repeat = run_loops(args, methods, model_dir, text, tmp)
    ratios = {m: round(loops[m]["median_step_s"] / loops["plain"]["median_step_s"], 3) for m in methods}
    print(", ".join(f"trainer {m} / plain LoRA loop: {r}" for m, r in ratios.items()), flush=True)
    result = {
        "trainer_over_plain": ratios,
        "loops": loops,
        "device": args.device,
        "model": str(args.model) if args.model else f"random llama {shape}",
        "repeats": args.repeats,
        "micro_batch": args.micro_batch,
        "seq": args.seq,
    }
    if "lora" in methods:
        result["over_lora"] = over_lora(per_repeat, methods)
        for m, r in result["over_lora"].items():
            print(
                f"trainer {m} / trainer lora: "
                + ", ".join(f"{k} {v['median']} [{v['min']}-{v['max']}]" for k, v in r.items()),
                flush=True,
            )
    if args.out:
        extra = {"per_repeat": per_repeat, "threads": args.threads or None, "rank": args.rank}
        write_result(args.out, {**result, **extra, "num_sparse": args.num_sparse}, args.device)
    print(json.dumps(result))


def over_lora(per_repeat: list[dict[str, dict]], methods: list[str]) -> dict:
    """Per method: median, min and max over the repeats of its trainer's median step and peak RSS divided by the lora
    trainer's of the same repeat."""
    out = {}
    for method in methods:
        out[method] = {}
        for name, key in (("step_time", "median_step_s"), ("peak_rss", "peak_rss_bytes")):
            values = [run[method][key] / run["lora"][key] for run in per_repeat if method in run and "lora" in run]
            if values:
                out[method][name] = spread(values)
    return out


if __name__ == "__main__":
    main()
