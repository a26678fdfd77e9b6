"""What is trained, per `method`: DSEE (the default), PEFT LoRA, or full fine-tuning.

The trainer (recipes/finetune.py) is the same for all three: same data, order, loss, optimizer and loop.
Only two steps differ and live here:

- `prepare_trainable`: wraps/freezes the loaded model and returns (the model to train, its trainable
  parameters). dsee: the DSEE layers of dsee/inject.py (done by the trainer's own DSEE set-up); lora:
  PEFT's own LoRA layers (`get_peft_model`) on the matched target modules, rank/alpha/dropout from
  `dsee.lora_*`; full: every parameter trainable.
- `save_trained`: writes the result. dsee: the DSEE adapter (dsee/adapter.py); lora: a PEFT adapter
  directory (`adapter/`, loadable with `PeftModel.from_pretrained`); full: a whole Hugging Face model
  (`merged/`, with the base model's tokenizer). Under ZeRO-3 each tensor is gathered one at a time and
  passed to the writer explicitly: PEFT's own `save_pretrained` on a partitioned model writes empty tensors.
"""

from __future__ import annotations

import json
import logging
import os
import typing
from pathlib import Path

import torch

from dsee_dist.config.schema import TrainingMethod
from dsee_dist.engine import distributed
from dsee_dist.errors import ConfigError
from dsee_dist.utils.files import atomic_directory

logger = logging.getLogger(__name__)

METHODS = typing.get_args(TrainingMethod)
PEFT_ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


def method_of(cfg) -> str:
    """The configured method (`method` key of the config; `dsee` for configs written before it existed)."""
    method = getattr(cfg, "method", "dsee")
    if method not in METHODS:
        raise ConfigError(f"method '{method}' is not supported; choose one of: {', '.join(METHODS)}")
    return method


def lora_target_names(model, dsee_cfg) -> list[str]:
    """Full names of the modules PEFT LoRA adapts: the same matching as DSEE's (dsee.target_modules and
    dsee.exclude_modules). A fused GPT-2 c_attn is adapted as one matrix (PEFT has no q/v slices)."""
    from dsee_dist.dsee.inject import find_targets

    return [spec.name for spec in find_targets(model, dsee_cfg.target_modules, [], dsee_cfg.exclude_modules)]


def prepare_lora(model, dsee_cfg, seed: int):
    """(PeftModel, trainable parameters): PEFT's LoRA layers, rank `dsee.lora_rank`, on the target modules."""
    from peft import LoraConfig, get_peft_model

    from dsee_dist.dsee.layer import is_conv1d

    names = lora_target_names(model, dsee_cfg)
    fan_in_fan_out = any(is_conv1d(model.get_submodule(n)) for n in names)
    config = LoraConfig(
        r=dsee_cfg.lora_rank,
        lora_alpha=dsee_cfg.lora_alpha,
        lora_dropout=dsee_cfg.lora_dropout,
        target_modules=names,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # PEFT draws A from the global generator: the same A on every rank
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, trainable


def prepare_full(model):
    """(model, all its parameters), every one trainable."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model, list(model.parameters())


def prepare_trainable(cfg, model):
    """(the model to train, its trainable parameters) for method `lora` or `full` (DSEE is set up by the
    trainer's own injection). Refuses what only DSEE supports: the two-stage pruning recipe."""
    method = method_of(cfg)
    if cfg.prune.method != "none":
        raise ConfigError(
            f"prune.method={cfg.prune.method} (the two-stage recipe) needs method=dsee, got "
            f"method={method}; set method=dsee or prune.method=none"
        )
    if method == "lora":
        return prepare_lora(model, cfg.dsee, cfg.train.seed)
    if method == "full":
        return prepare_full(model)
    raise ValueError(f"prepare_trainable handles lora and full, not '{method}'")


def _gathered_state(named_params, is_rank_zero: bool) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of the named parameters on rank 0 (one ZeRO-3 gather per tensor; collective)."""
    state = {}
    for name, param in named_params:
        with distributed.gathered([param]):
            if is_rank_zero:
                state[name] = param.detach().to("cpu", torch.float32, copy=True).contiguous()
    return state


def save_lora_adapter(peft_model, target: Path, *, base_model: str, is_rank_zero: bool) -> None:
    """Collective. Rank 0 writes a PEFT adapter directory (adapter_model.safetensors + adapter_config.json)."""
    state = _gathered_state([(n, p) for n, p in peft_model.named_parameters() if p.requires_grad], is_rank_zero)
    if not is_rank_zero:
        return
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    with atomic_directory(target) as tmp:
        peft_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)


def save_full_model(model, target: Path, *, base_model: str, is_rank_zero: bool) -> None:
    """Collective. Rank 0 writes the whole fine-tuned model as an ordinary Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    from dsee_dist.models.loading import end_zero3_init

    state = _gathered_state(list(model.named_parameters()), is_rank_zero)
    if not is_rank_zero:
        return
    end_zero3_init()  # a whole model on rank 0, also after a ZeRO-3 run
    whole = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    missing, unexpected = whole.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied(whole)]
    if missing or unexpected:
        raise RuntimeError(f"full fine-tuning export: missing {missing[:3]}, unexpected {unexpected[:3]}")
    whole.config.use_cache = True
    save_hf_model(whole, base_model, Path(target))


def save_hf_model(model, base_model: str, target: Path) -> None:
    """An ordinary Hugging Face directory (model + the base model's tokenizer), written atomically."""
    from dsee_dist.recipes.export import save_merged

    save_merged(model, base_model, Path(target))


def _tied(model) -> set[str]:
    """Parameter names that are duplicates of another (tied embeddings): absent from named_parameters()."""
    unique = {n for n, _ in model.named_parameters()}
    return {n for n, _ in model.named_parameters(remove_duplicate=False) if n not in unique}


def save_trained(method: str, model, out_dir: Path, *, base_model: str, dsee_cfg, is_rank_zero: bool) -> Path:
    """Collective: write the training result into out_dir (adapter/ or merged/); returns its path."""
    out_dir = Path(out_dir)
    if method == "dsee":
        from dsee_dist.dsee.adapter import save_adapter

        save_adapter(model, out_dir / "adapter", base_model=base_model, dsee_cfg=dsee_cfg, is_rank_zero=is_rank_zero)
        target = out_dir / "adapter"
    elif method == "lora":
        target = out_dir / PEFT_ADAPTER_DIR
        save_lora_adapter(model, target, base_model=base_model, is_rank_zero=is_rank_zero)
    else:
        target = out_dir / MERGED_DIR
        save_full_model(model, target, base_model=base_model, is_rank_zero=is_rank_zero)
    if is_rank_zero:
        (out_dir / "trained.json").write_text(json.dumps({"method": method, "path": target.name}) + "\n")
    return target


def is_peft_adapter(path: str | os.PathLike) -> bool:
    config = Path(path) / "adapter_config.json"
    return config.is_file() and "peft_type" in json.loads(config.read_text())


def merge_peft_adapter(
    adapter_dir: str | os.PathLike, target: str | os.PathLike, base_model: str | None = None
) -> Path:
    """A PEFT LoRA adapter folded into its base model, written as an ordinary Hugging Face directory."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    save_hf_model(merged, base, Path(target))
    return Path(target)
