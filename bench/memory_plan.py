"""`dsee-dist plan` against measured peaks: real training steps (DeepSpeed engine, 1 rank) per configuration.

    python bench/memory_plan.py          # GPU: torch.cuda.max_memory_allocated vs the plan, target within 15 %
    python bench/memory_plan.py --cpu    # CPU: the allocator's peak (torch profiler) vs the plan, within 30 %

Each configuration runs in its own process: a randomly initialised model (GPT-2 or Llama shape, no download),
DSEE injected on a random support, random tokens with padding, the project's loss, a few optimizer steps. The
peak is taken over everything allocated from just before the model is built to the end of the last step.
Without a GPU (and without --cpu) it prints one line saying the GPU measurement was skipped.
Last line: JSON with the per-configuration ratios measured / planned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import device_kind, end_rank  # noqa: E402
from _dsee_model import inject_random_dsee  # noqa: E402

GPT2_SMALL = {
    "model_type": "gpt2",
    "n_layer": 12,
    "n_embd": 768,
    "n_head": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
TINYLLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 22,
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

CPU_GPT2 = {
    "model_type": "gpt2",
    "n_layer": 6,
    "n_embd": 384,
    "n_head": 6,
    "n_positions": 256,
    "vocab_size": 8192,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
CPU_LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 4,
    "hidden_size": 256,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 704,
    "vocab_size": 4096,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def cases(gpt2: dict, llama: dict, names: tuple[str, str], *, stages, precision, micro, seq, long_seq, chunk):
    """name -> one measurement: GPT-2 under two ZeRO stages, Llama (GQA, q/v adapted) under ZeRO-2, and Llama
    at `long_seq` with activation checkpointing and a chunked loss."""
    out = {
        f"{names[0]} zero{stage} {precision} b{micro}x{seq}": dict(
            hf=gpt2, ds=f"zero{stage}_{precision}", micro_batch=micro, seq=seq
        )
        for stage in stages
    }
    llama_case = dict(hf=llama, ds=f"zero2_{precision}", micro_batch=micro, targets=["q_proj", "v_proj"])
    out[f"{names[1]} zero2 {precision} b{micro}x{seq}"] = dict(llama_case, seq=seq)
    out[f"{names[1]} zero2 {precision} b{micro}x{long_seq} checkpointed, chunked loss"] = dict(
        llama_case, seq=long_seq, checkpointing=True, chunk_tokens=chunk
    )
    return out


# GPU: real model sizes; CPU: small shapes that run in seconds.
GPU_CASES = cases(
    GPT2_SMALL,
    TINYLLAMA,
    ("gpt2-small", "tinyllama-1.1b"),
    stages=(2, 3),
    precision="bf16",
    micro=8,
    seq=512,
    long_seq=2048,
    chunk=4096,
)
CPU_CASES = cases(
    CPU_GPT2,
    CPU_LLAMA,
    ("gpt2 6x384", "llama 4x256 gqa"),
    stages=(0, 2),
    precision="fp32",
    micro=4,
    seq=128,
    long_seq=128,
    chunk=128,
)


def case_spec(case: dict, device: str) -> dict:
    """A case with every default filled in (what `--one` reads)."""
    gpt2 = case["hf"]["model_type"] == "gpt2"
    return {
        "hf": case["hf"],
        "ds": json.loads((ROOT / "configs" / "ds" / f"{case['ds']}.json").read_text()),
        "micro_batch": case["micro_batch"],
        "seq": case["seq"],
        "steps": case.get("steps", 3),
        "targets": case.get("targets", ["c_attn"]),
        "fused_slices": ["q", "v"] if gpt2 else [],
        "rank": case.get("rank", 8),
        "num_sparse": case.get("num_sparse", 64),
        "checkpointing": case.get("checkpointing", False),
        "chunk_tokens": case.get("chunk_tokens", 0),
        "device": device,
    }


class _DSEESettings:
    """The dsee.* keys the plan reads, for a bench case."""

    def __init__(self, spec: dict):
        self.lora_rank, self.num_sparse = spec["rank"], spec["num_sparse"]
        self.target_modules, self.fused_slices, self.exclude_modules = spec["targets"], spec["fused_slices"], []


def planned(spec: dict) -> dict:
    from dsee_dist.recipes.plan import plan_run

    plan, _ = plan_run(
        spec["hf"],
        method="dsee",
        dsee_cfg=_DSEESettings(spec),
        ds_config=_full_ds(spec),
        world_size=1,
        micro_batch_size=spec["micro_batch"],
        seq_len=spec["seq"],
        padded=True,
        activation_checkpointing=spec["checkpointing"],
        loss_chunk_tokens=spec["chunk_tokens"],
        dropout=0.0,
    )
    return {"peak_bytes": plan.peak, "rows_bytes": plan.rows}


def _full_ds(spec: dict) -> dict:
    from dsee_dist.engine import deepspeed_engine

    return deepspeed_engine.build_deepspeed_config(
        spec["ds"], {}, micro_batch_size=spec["micro_batch"], grad_accum_steps=1, grad_clip=1.0, world_size=1
    )


def _batch(spec: dict, step: int, vocab: int):
    """Random tokens; every other sequence is padded over its last quarter (mask 0, no labels there)."""
    import torch

    g = torch.Generator().manual_seed(step)
    b, s = spec["micro_batch"], spec["seq"]
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[::2, s - s // 4 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def measure(specs: list[dict]) -> list[dict]:
    """Peak bytes allocated by `spec["steps"]` training steps of each spec (one after the other, in this process),
    from just before its model is built."""
    import gc

    import torch

    from dsee_dist.engine import process_group
    from dsee_dist.recipes.loss import token_loss_sum

    warnings.filterwarnings("ignore")
    process_group.init_distributed()
    dev = process_group.device()
    results = []
    for spec in specs:
        gc.collect()
        ds = _full_ds(spec)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.device(dev):
                run_steps(spec, ds, dev, token_loss_sum)
            torch.cuda.synchronize()
            results.append(
                {"peak_bytes": torch.cuda.max_memory_allocated() - base, "how": "torch.cuda.max_memory_allocated"}
            )
            continue
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run_steps(spec, ds, dev, token_loss_sum)
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
            events = json.loads((Path(tmp) / "trace.json").read_text())["traceEvents"]
        memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
        # The allocator's running total also counts what earlier windows left allocated: measure from its start.
        start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"] if memory else 0
        peak = max((e["args"]["Total Allocated"] for e in memory), default=start) - start
        results.append({"peak_bytes": peak, "how": "CPU allocator peak (torch.profiler, profile_memory)"})
    return results


def run_steps(spec: dict, ds: dict, dev, loss_fn) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsee_dist.engine import deepspeed_engine
    from dsee_dist.models import loading

    if ds["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        loading._HF_DS_CONFIG = HfDeepSpeedConfig(ds)
    dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
    config = AutoConfig.for_model(**spec["hf"])
    for key in loading.DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    config.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params, _ = inject_random_dsee(
        model, spec["rank"], spec["num_sparse"], targets=spec["targets"], fused_slices=spec["fused_slices"]
    )
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    engine, _, _ = deepspeed_engine.build_engine(model, optimizer, None, ds)
    engine.train()
    for step in range(spec["steps"]):
        loss, _ = loss_fn(engine, _batch(spec, step, config.vocab_size), dev, spec["chunk_tokens"])
        engine.backward(loss)
        engine.step()


def run_cases(specs: list[dict]) -> list[dict]:
    """The measurements in a fresh process (`--one`), with the planned peaks beside them."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "specs.json"
        spec_file.write_text(json.dumps(specs))
        from dsee_dist.engine.launcher import launch_env

        env = launch_env()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--one", str(spec_file)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    results = []
    for spec, one in zip(specs, measured):
        plan = planned(spec)
        results.append(
            {
                "measured_bytes": one["peak_bytes"],
                "planned_bytes": plan["peak_bytes"],
                "how": one["how"],
                "planned_rows_bytes": plan["rows_bytes"],
                "measured_over_planned": round(one["peak_bytes"] / plan["peak_bytes"], 4),
            }
        )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="measure the small CPU cases (allocator peaks) instead")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # the measuring process: it joined a process group (gloo on CPU), so it ends as a rank does
        print(json.dumps(measure(json.loads(Path(args.one).read_text()))))
        end_rank(0)
    if device_kind("cpu" if args.cpu else "gpu", "memory_plan.py", "the GPU measurement", "--cpu") is None:
        return
    import torch

    cases, tolerance = (CPU_CASES, 0.30) if args.cpu else (GPU_CASES, 0.15)
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    results = {}
    for name, case in cases.items():  # a fresh process per case: nothing of one case's run is left in the next
        (result,) = run_cases([case_spec(case, device)])
        results[name] = result
        within = abs(result["measured_over_planned"] - 1) <= tolerance
        print(
            f"{name:60s} measured {result['measured_bytes'] / 2**20:9.1f} MiB  planned "
            f"{result['planned_bytes'] / 2**20:9.1f} MiB  ratio {result['measured_over_planned']:.3f}"
            f"{'' if within else '  OUTSIDE ' + format(tolerance, '.0%')}",
            flush=True,
        )
    print(
        json.dumps(
            {
                "device": device,
                "tolerance": tolerance,
                "ratios": {k: v["measured_over_planned"] for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
