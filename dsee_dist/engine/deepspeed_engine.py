"""The DeepSpeed engine: its config (engine JSON + the settings the experiment config owns) and its
construction, plus what the recipes read back from it (the optimizer inside ZeRO's wrappers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsee_dist.config import global_batch_size, merge_nested, resolve_path
from dsee_dist.errors import ConfigError


def resolve_deepspeed_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON (line {exc.lineno}): {exc.msg}") from None


OWNED_KEYS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
}


def build_deepspeed_config(
    engine_json: dict,
    overrides: dict,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    grad_clip: float,
    world_size: int,
) -> dict:
    """Engine JSON + overrides + the experiment-owned settings; a conflicting value is an error."""
    ds = merge_nested(engine_json, overrides)
    owned = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
    }
    for key, value in owned.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ConfigError(
                f"DeepSpeed config sets {key}={ds[key]} but it is owned by {OWNED_KEYS[key]}={value}; "
                f"remove it from the JSON"
            )
        ds[key] = value
    global_batch = global_batch_size(micro_batch_size, grad_accum_steps, world_size)
    if ds.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ConfigError(
            f"DeepSpeed config sets train_batch_size={ds['train_batch_size']} but "
            f"micro_batch_size x grad_accum_steps x world_size = {global_batch}; remove it from the JSON"
        )
    ds["train_batch_size"] = global_batch
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            "DeepSpeed config must not define 'optimizer' or 'scheduler': dsee_dist builds them from train.*"
        )
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None):
        # The optimizer is built in code (torch AdamW, or DeepSpeedCPUAdam when offloading).
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def deepspeed_config_of(cfg, world_size: int) -> dict:
    """The DeepSpeed config of an experiment config run at `world_size` ranks: its engine JSON
    (`deepspeed.config`), `deepspeed.overrides` and the settings the experiment owns (`build_deepspeed_config`).
    The trainer and `dsee-dist plan` both use it."""
    return build_deepspeed_config(
        resolve_deepspeed_json(resolve_path(cfg, cfg.deepspeed.config)),
        cfg.deepspeed.overrides,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        grad_clip=cfg.train.grad_clip,
        world_size=world_size,
    )


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_engine(model, optimizer, lr_scheduler, ds_config: dict):
    import deepspeed

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_config,
        model_parameters=None,
    )
    _exclude_tied_frozen_weights_from_checkpoints(engine)
    return engine, optimizer, lr_scheduler


def _exclude_tied_frozen_weights_from_checkpoints(engine) -> None:
    """`save_checkpoint(exclude_frozen_parameters=True)` drops frozen tensors found by `named_parameters()`,
    which skips tied duplicates: GPT-2's lm_head.weight (tied to the frozen embedding) would be written
    into every adapter-sized checkpoint (51 M values for GPT-2). Drop frozen tensors under all their names."""
    original = engine.module_state_dict

    def module_state_dict(destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        state = original(
            destination=destination,
            prefix=prefix,
            keep_vars=keep_vars,
            exclude_frozen_parameters=exclude_frozen_parameters,
        )
        if exclude_frozen_parameters:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(prefix + name, None)
        return state

    engine.module_state_dict = module_state_dict


def inner_optimizer(engine):
    """The torch optimizer inside DeepSpeed's ZeRO wrappers (its state is keyed by the flat fp32 partitions)."""
    opt = engine.optimizer
    while getattr(opt, "optimizer", None) is not None and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


def optimizer_state_numel(engine) -> int:
    """Values in this rank's Adam first-moment state: shows what the optimizer really holds (only
    the adapters, and under ZeRO >= 1 only this rank's partition of them)."""
    return sum(state["exp_avg"].numel() for state in inner_optimizer(engine).state.values() if "exp_avg" in state)


def reports_grad_norm(engine) -> bool:
    """Whether `engine.get_global_grad_norm()` is measured by DeepSpeed: its ZeRO, fp16 and bf16 optimizers
    measure the norm before clipping; a plain fp32 ZeRO-0 engine clips with torch and keeps no norm."""
    return bool(engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())


def trainable_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of the trainable parameters' gradients, on their device (no host sync). Under ZeRO-0 the
    gradients are averaged over ranks at the accumulation boundary's backward, so this is the global norm."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in module.parameters() if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def build_optimizer(param_groups, ds_config: dict, lr: float, betas, weight_decay: float):
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu" and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
