"""One (family, method, DeepSpeed config) step-time measurement; launched by bench/step_time.py under deepspeed.

GPT-2 (fused c_attn: DSEE on its q and v slices, PEFT LoRA on the fused matrix) or Llama (GQA; DSEE and PEFT
LoRA on q_proj and v_proj), random, or a pretrained model from --model (a local Hugging Face directory). supra and
shira are PEFT's Supertuning (r + as many sparse entries as DSEE's N per matrix in total) and SHiRA (LoRA's count),
built by recipes/methods.py as the trainer builds them (nn.Linear targets only: not GPT-2's Conv1D).

Memory, per rank: peak RSS of the process (ru_maxrss / VmHWM, model loading included), the peak RSS of the
training steps alone (VmHWM reset through /proc/self/clear_refs before the first step) and what the steps add
above the RSS of the built engine; on CUDA, torch.cuda.max_memory_allocated over the steps."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import end_rank  # noqa: E402
from _dsee_model import inject_random_dsee  # noqa: E402

from dsee_dist.engine import deepspeed_engine, process_group  # noqa: E402

# Bytes this rank sends into collectives during the measured steps, by kind: "grad" (all-reduce,
# reduce-scatter, reduce: gradient reduction) and "param" (all-gather, broadcast: parameter gathering).
COMM = {"grad": 0, "param": 0}
COUNTING = [False]


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def count_collectives() -> None:
    """Wrap torch.distributed's collectives before DeepSpeed binds them (it caches some at init)."""
    import torch.distributed as dist

    def wrap(name: str, kind: str, size) -> None:
        original = getattr(dist, name, None)
        if original is None:
            return

        def counted(*args, **kwargs):
            if COUNTING[0]:
                COMM[kind] += size(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(dist, name, counted)

    first = lambda *a, **k: _nbytes(k.get("tensor", a[0] if a else None))  # noqa: E731
    wrap("all_reduce", "grad", first)
    wrap("reduce", "grad", first)
    wrap("reduce_scatter_tensor", "grad", lambda *a, **k: _nbytes(k.get("input", a[1] if len(a) > 1 else None)))
    wrap(
        "reduce_scatter",
        "grad",
        lambda *a, **k: sum(_nbytes(t) for t in k.get("input_list", a[1] if len(a) > 1 else [])),
    )
    wrap("all_gather_into_tensor", "param", lambda *a, **k: _nbytes(k.get("output_tensor", a[0] if a else None)))
    wrap("all_gather", "param", lambda *a, **k: sum(_nbytes(t) for t in k.get("tensor_list", a[0] if a else [])))
    wrap("broadcast", "param", first)


def model_state_bytes(model, engine) -> int:
    """This rank's parameters (its ZeRO-3 partition, or whole) + optimizer master copies and moments."""
    total = 0
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)
        total += _nbytes(local) if local is not None else _nbytes(p)
    zero = engine.optimizer
    masters = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(
        zero, "single_partition_of_fp32_groups", None
    )
    inner = deepspeed_engine.inner_optimizer(engine)
    masters = masters or [p for group in inner.param_groups for p in group["params"]]
    total += sum(_nbytes(m) for m in masters)
    for state in inner.state.values():
        total += sum(_nbytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def build_model(args):
    """A randomly initialised model of the requested shape, dropout off (the step time does not depend on weights)."""
    if args.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=args.n_head,
            vocab_size=args.vocab,
            n_positions=args.seq,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = args.intermediate or 64 * round(8 * args.n_embd / 3 / 64)
    config = LlamaConfig(
        num_hidden_layers=args.n_layer,
        hidden_size=args.n_embd,
        num_attention_heads=args.n_head,
        num_key_value_heads=args.n_kv_head or args.n_head,
        intermediate_size=intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def _proc_status_bytes(key: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peft_sparse(model, method: str, targets: list[str], rank: int, num_sparse: int) -> tuple:
    """(PeftModel, trainable parameters) of PEFT's Supertuning (supra) or SHiRA, as the trainer builds them."""
    from dsee_dist.config.schema import DSEEConfig
    from dsee_dist.recipes import methods

    cfg = DSEEConfig(lora_rank=rank, lora_alpha=2 * rank, num_sparse=num_sparse, target_modules=targets)
    return (methods.prepare_supra if method == "supra" else methods.prepare_shira)(model, cfg, 0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["full", "lora", "dsee", "supra", "shira"], required=True)
    p.add_argument("--model", default=None, help="a local Hugging Face directory instead of a random model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank; 0 = cores / ranks on this node")
    p.add_argument("--family", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--n-kv-head", type=int, default=0, help="Llama: key/value heads (GQA); 0 = --n-head")
    p.add_argument("--intermediate", type=int, default=0, help="Llama: MLP width; 0 = 8/3 x hidden, rounded to 64")
    p.add_argument("--ds-config", required=True)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-sparse", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--result", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument("--count-comm", action="store_true", help="count collective bytes during the measured steps")
    return p.parse_args()


def join_and_configure(args) -> tuple:
    """(DistInfo, DeepSpeed config): the process group joined (collectives wrapped first with --count-comm), CPU
    threads set, and under ZeRO-3 the config handed to transformers so that models are built partitioned."""
    if args.count_comm:
        count_collectives()
    info = process_group.init_distributed()
    if not torch.cuda.is_available():  # one rank per core share: oversubscription makes CPU timings noise
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    ds = deepspeed_engine.build_deepspeed_config(
        json.loads(Path(args.ds_config).read_text()),
        {},
        micro_batch_size=args.micro_batch,
        grad_accum_steps=1,
        grad_clip=1.0,
        world_size=info.world_size,
    )
    from dsee_dist.models import loading as models

    if ds["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        models._HF_DS_CONFIG = HfDeepSpeedConfig(ds)
    return info, ds


def load_model(args, ds: dict):
    """The random model of the requested shape, or --model (then --vocab and --family become the model's)."""
    torch.manual_seed(0)
    if not args.model:
        return build_model(args)
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.config.use_cache = False
    args.vocab = model.config.vocab_size
    args.family = "gpt2" if model.config.model_type == "gpt2" else "llama"
    return model


def adapt(model, args) -> tuple:
    """(model, trainable parameters) for --method: q and v adapted (GPT-2's fused c_attn, Llama's q/v_proj)."""
    targets = ["c_attn"] if args.family == "gpt2" else ["q_proj", "v_proj"]
    if args.method == "full":
        return model, [p for p in model.parameters()]
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=args.rank,
                lora_alpha=2 * args.rank,
                target_modules=targets,
                fan_in_fan_out=args.family == "gpt2",
                lora_dropout=0.0,
            ),
        )
        return model, [p for p in model.parameters() if p.requires_grad]
    if args.method in ("supra", "shira"):
        return peft_sparse(model, args.method, targets, args.rank, args.num_sparse)
    slices = ["q", "v"] if args.family == "gpt2" else []  # GPT-2: the q and v thirds of c_attn; Llama: whole
    return model, inject_random_dsee(model, args.rank, args.num_sparse, targets=targets, fused_slices=slices)[0]


def timed_steps(engine, args, info) -> tuple[list[float], dict]:
    """(seconds of each measured step, RSS readings around the steps): warm-up, then --steps steps, each between
    barriers; collectives counted during the measured ones."""
    dev = process_group.device()
    g = torch.Generator().manual_seed(info.rank)
    rss = {"build_peak": _proc_status_bytes("VmHWM"), "before_steps": _proc_status_bytes("VmRSS")}
    peak_reset = reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g).to(dev)
        process_group.barrier()
        COUNTING[0] = i >= args.warmup
        t0 = time.perf_counter()
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        COUNTING[0] = False
        process_group.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    rss["steps_peak"] = _proc_status_bytes("VmHWM") if peak_reset else None
    return times, rss


def rank_figures(args, model, engine, rss: dict) -> dict:
    """This rank's traffic, model state, memory and threads."""
    import resource

    steps_peak, before = rss["steps_peak"], rss["before_steps"]
    return {
        "grad_bytes_per_step": COMM["grad"] / args.steps,
        "param_bytes_per_step": COMM["param"] / args.steps,
        "model_state_bytes": model_state_bytes(model, engine),
        "peak_rss_bytes": max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss["build_peak"] or 0, steps_peak or 0
        ),
        "steps_peak_rss_bytes": steps_peak,
        "steps_added_rss_bytes": steps_peak - before if steps_peak and before else None,
        "threads": torch.get_num_threads(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args()
    info, ds = join_and_configure(args)
    model, params = adapt(load_model(args, ds), args)
    engine, _, _ = deepspeed_engine.build_engine(model, torch.optim.AdamW(params, lr=1e-4), None, ds)
    engine.train()
    times, rss = timed_steps(engine, args, info)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    per_rank = process_group.all_gather_object(rank_figures(args, model, engine, rss))
    if info.is_rank_zero:
        median = statistics.median(times)
        Path(args.result).write_text(
            json.dumps(
                {
                    "median_step_s": median,
                    "trainable": trainable,
                    "p90_over_median": sorted(times)[int(0.9 * (len(times) - 1))] / median,
                    "tokens_per_s": args.micro_batch * args.seq * info.world_size / median,
                    "steps": len(times),
                    "per_rank": per_rank,
                }
            )
        )


if __name__ == "__main__":
    main()
    end_rank(0)
