"""The model a command runs (`dsee-dist generate`, `dsee-dist evaluate --perplexity`, the quickstart), from any of
four sources: (a) a training checkpoint (a step directory, a checkpoints/ root or a run's output.dir; any ZeRO
stage and world size), (b) an adapter export (DSEE's, or a PEFT method's, on the base model it records, or
`base_model`), (c) a merged or pruned export, or (d) a plain Hugging Face model directory. A checkpoint or
adapter runs with its DSEE layers unmerged."""

from __future__ import annotations

from pathlib import Path

from dsee_dist.errors import DSEEError
from dsee_dist.recipes.methods import is_peft_adapter

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def describe_source(path: Path) -> str:
    """adapter | peft-adapter | hf-model | checkpoint."""
    if is_peft_adapter(path):
        return "peft-adapter"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "hf-model"
    return "checkpoint"


def load_generation_model(source: str, base_model: str | None = None, dtype: str = "fp32"):
    """(model in eval mode, tokenizer, kind) from any of the four sources (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsee_dist.models.loading import load_tokenizer
    from dsee_dist.models.pruned_gpt2 import register

    path = Path(source)
    if not path.exists():
        raise DSEEError(f"model '{source}' does not exist; give a checkpoint, an adapter export or a model directory")
    register()  # structurally pruned GPT-2 exports load without remote code
    torch_dtype = getattr(torch, DTYPES[dtype])
    kind = describe_source(path)
    if kind == "adapter":
        from dsee_dist.dsee.adapter import load_adapted_model, read_adapter_config

        base = base_model or read_adapter_config(path)["base_model"]
        model = load_adapted_model(path, base, dtype=torch_dtype)
    elif kind == "peft-adapter":
        from peft import PeftConfig, PeftModel

        base = base_model or PeftConfig.from_pretrained(str(path)).base_model_name_or_path
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype), str(path))
    elif kind == "hf-model":
        base = str(path)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    else:
        from dsee_dist.recipes.export import build_model_from_checkpoint, resolve_checkpoint

        checkpoint_dir = resolve_checkpoint(str(path))
        model, _, base = build_model_from_checkpoint(checkpoint_dir, base_model)
        model = model.to(torch_dtype)
        kind = f"checkpoint {checkpoint_dir}"
    tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else Path(base)
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except (OSError, ValueError):
        raise DSEEError(
            f"no tokenizer in '{tokenizer_dir}'; give --base-model with the base model's directory"
        ) from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer, kind
