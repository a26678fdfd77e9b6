"""`dsee-dist plan CONFIG [overrides] [--device-memory 80GiB] [--world-size N] [--json]`: per-rank memory of a
run before it is launched, and whether it fits.

The model is built on the meta device from its config.json (no weights are read), the trained modules are found
by the same matching the trainer uses, and dsee_dist.engine.memory does the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re

from dsee_dist.config import Config, load_config, resolve_path
from dsee_dist.engine import memory
from dsee_dist.engine.process_exit import reports_errors
from dsee_dist.errors import ConfigError

logger = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '512MiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"--device-memory '{text}' is not a size; write e.g. 80GiB, 141GB or 24576MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def hf_config_of(cfg: Config) -> dict:
    """The model's config.json as a dict: from model.path, or the built-in shape (model.builtin)."""
    if cfg.model.path is not None:
        path = resolve_path(cfg, cfg.model.path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(
                f"model.path '{cfg.model.path}' has no config.json; dsee-dist plan reads the model's "
                f"shape from it (no weights are needed): point model.path at a local model directory"
            )
        return json.loads(config_file.read_text())
    from dsee_dist.config.schema import BUILTIN_MODELS

    return {
        "model_type": "gpt2",
        "vocab_size": cfg.model.tokenizer_vocab_size,
        "bos_token_id": 0,
        "eos_token_id": 0,
        **BUILTIN_MODELS[cfg.model.builtin],
    }


def _meta_model(hf_config: dict):
    """The model with all parameters on the meta device (shapes only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def trained_modules(model, shape: memory.ModelShape, method: str, dsee_cfg) -> list[memory.AdaptedModule]:
    """The modules the run trains, as the trainer finds them (dsee.target_modules, fused_slices, exclude)."""
    from dsee_dist.dsee.inject import find_targets

    if method in ("supra", "shira"):
        raise ConfigError(
            f"dsee-dist plan has no memory model for method={method} (PEFT's layer composes a dense out x in "
            f"weight per adapted matrix in every forward); plan method=lora for a lower bound"
        )
    by_name = {m.name: m for m in memory.linear_modules(shape)}
    if method == "full":
        return [
            memory.AdaptedModule(m, "full")
            for m in by_name.values()
            if not (m.name == "lm_head" and shape.tied_embeddings)
        ]
    fused = dsee_cfg.fused_slices if method == "dsee" else []
    specs = find_targets(model, dsee_cfg.target_modules, fused, dsee_cfg.exclude_modules)
    adapted = []
    for spec in specs:
        if spec.name not in by_name:
            raise ConfigError(
                f"dsee-dist plan has no activation model for the adapted module '{spec.name}'; "
                f"plan a run that adapts the attention or MLP projections"
            )
        if method == "lora":
            adapted.append(memory.AdaptedModule(by_name[spec.name], "lora"))
        else:
            adapted.append(memory.AdaptedModule(by_name[spec.name], "dsee", len(spec.slices), spec.slices[0][1]))
    return adapted


def plan_run(
    hf_config: dict,
    *,
    method: str,
    dsee_cfg,
    ds_config: dict,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    padded: bool,
    activation_checkpointing: bool = False,
    loss_chunk_tokens: int = 0,
    dropout: float | None = None,
) -> tuple[memory.MemoryPlan, memory.ModelShape]:
    """The memory plan of one run, from its parts (also used by bench/memory_plan.py)."""
    shape = memory.shape_from_hf_config(hf_config, dropout=dropout)
    model = _meta_model(hf_config)
    adapted = trained_modules(model, shape, method, dsee_cfg)
    total = sum(p.numel() for p in model.parameters())
    extra = []
    if method == "full":
        linear_names = {m.module.name + suffix for m in adapted for suffix in (".weight", ".bias")}
        extra = [p.numel() for name, p in model.named_parameters() if name not in linear_names]
    rank = dsee_cfg.lora_rank
    num_sparse = dsee_cfg.num_sparse if method == "dsee" else 0
    engine = memory.EngineSettings.from_deepspeed_config(ds_config, world_size)
    workload = memory.Workload(micro_batch_size, seq_len, padded, activation_checkpointing, loss_chunk_tokens)
    plan = memory.compute_plan(
        shape, adapted, rank, num_sparse, engine, workload, total_params=total, extra_trainable=extra
    )
    return plan, shape


def plan_config(cfg: Config, world_size: int) -> tuple[memory.MemoryPlan, memory.ModelShape, dict]:
    """The plan of an experiment config at `world_size` ranks, and the DeepSpeed config it was made with."""
    from dsee_dist.engine import deepspeed_engine
    from dsee_dist.recipes.methods import method_of

    ds_config = deepspeed_engine.deepspeed_config_of(cfg, world_size)
    train = cfg.train
    plan, shape = plan_run(
        hf_config_of(cfg),
        method=method_of(cfg),
        dsee_cfg=cfg.dsee,
        ds_config=ds_config,
        world_size=world_size,
        micro_batch_size=train.micro_batch_size,
        seq_len=cfg.data.block_size,
        padded=cfg.data.format != "text",
        activation_checkpointing=getattr(train, "activation_checkpointing", False),
        loss_chunk_tokens=getattr(train, "loss_chunk_tokens", 0),
        dropout=cfg.model.dropout,
    )
    return plan, shape, ds_config


def _size(n: int) -> str:
    return f"{n / memory.GIB:9.2f} GiB" if n >= memory.GIB else f"{n / memory.MIB:9.1f} MiB"


def render_table(plan: memory.MemoryPlan, shape: memory.ModelShape, header: str, device_bytes: int | None) -> str:
    lines = [header, f"{'component (per rank)':44s} {'memory':>13s}"]
    lines += [f"{name:44s} {_size(value)}" for name, value in plan.rows.items()]
    lines.append(f"{'peak':44s} {_size(plan.peak)}")
    lines.append(
        f"  activations without / with checkpointing: {_size(plan.activations_plain).strip()} / "
        f"{_size(plan.activations_checkpointed).strip()}"
    )
    if plan.logits_chunked < plan.logits_plain:
        lines.append(
            f"  logits + loss, plain / chunked: {_size(plan.logits_plain).strip()} / "
            f"{_size(plan.logits_chunked).strip()}"
        )
    else:
        lines.append(
            f"  logits + loss: {_size(plan.logits_plain).strip()}; train.loss_chunk_tokens={plan.suggested_chunk} "
            f"would hold {_size(plan.logits_suggested_chunk).strip()}"
        )
    if plan.host_bytes:
        lines.append(f"  offloaded to host memory: {_size(plan.host_bytes).strip()}")
    lines += [f"  note: {note}" for note in plan.notes]
    lines.append(verdict(plan, device_bytes))
    return "\n".join(lines)


def verdict(plan: memory.MemoryPlan, device_bytes: int | None) -> str:
    if device_bytes is None:
        return (
            f"verdict: peak {plan.peak / memory.GIB:.2f} GiB per rank; no device memory given "
            f"(pass --device-memory, e.g. 80GiB)"
        )
    share = plan.peak / device_bytes
    if plan.fits(device_bytes):
        return (
            f"verdict: FITS: peak {plan.peak / memory.GIB:.2f} GiB per rank of {device_bytes / memory.GIB:.2f} GiB "
            f"({share:.0%})"
        )
    return (
        f"verdict: DOES NOT FIT: peak {plan.peak / memory.GIB:.2f} GiB per rank > {device_bytes / memory.GIB:.2f} GiB "
        f"({share:.0%}); try train.activation_checkpointing=true, train.loss_chunk_tokens, a smaller "
        f"train.micro_batch_size, ZeRO-3 or more ranks"
    )


def _local_device_memory() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
    except Exception:  # noqa: BLE001 - no usable GPU: no default
        return None
    return None


@reports_errors("dsee-dist plan")
def main(argv: list[str] | None = None, prog: str = "dsee-dist plan") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("config", help="experiment YAML (e.g. configs/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as for training")
    parser.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "1")),
        help="ranks the run will use (default: $WORLD_SIZE or 1)",
    )
    parser.add_argument(
        "--device-memory",
        default=None,
        help="memory of one device, e.g. 80GiB (default: this machine's first GPU, if any)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_intermixed_args(argv)
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be at least 1, got {args.world_size}")
    device_bytes = parse_bytes(args.device_memory) if args.device_memory else _local_device_memory()
    cfg = load_config(args.config, args.overrides)
    plan, shape, ds_config = plan_config(cfg, args.world_size)
    engine = memory.EngineSettings.from_deepspeed_config(ds_config, args.world_size)
    if args.json:
        print(
            json.dumps(
                {
                    "rows_bytes": plan.rows,
                    "peak_bytes": plan.peak,
                    "device_bytes": device_bytes,
                    "fits": None if device_bytes is None else plan.fits(device_bytes),
                    "activations_plain_bytes": plan.activations_plain,
                    "activations_checkpointed_bytes": plan.activations_checkpointed,
                    "logits_plain_bytes": plan.logits_plain,
                    "logits_chunked_bytes": plan.logits_chunked,
                    "host_bytes": plan.host_bytes,
                    "trainable_params": plan.trainable_params,
                    "frozen_params": plan.frozen_params,
                    "zero_stage": engine.zero_stage,
                    "world_size": args.world_size,
                    "dtype": "bf16" if engine.bf16 else "fp32",
                    "micro_batch_size": cfg.train.micro_batch_size,
                    "seq_len": cfg.data.block_size,
                    "notes": plan.notes,
                }
            )
        )
        return 0
    header = (
        f"plan: {shape.family} {shape.n_layer} x {shape.hidden} ({shape.n_head} heads, {shape.n_kv_head} KV), "
        f"vocab {shape.vocab}; {plan.trainable_params:,} trainable / {plan.frozen_params:,} frozen parameters; "
        f"ZeRO-{engine.zero_stage}, {'bf16' if engine.bf16 else 'fp32'}, world size {args.world_size}, "
        f"micro-batch {cfg.train.micro_batch_size} x {cfg.data.block_size} tokens"
    )
    print(render_table(plan, shape, header, device_bytes))
    return 0
