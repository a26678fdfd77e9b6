"""Loading the pretrained decoder: a local Hugging Face directory, a GGUF file (dequantised once into an
ordinary safetensors directory, `materialize_gguf_model`), or a built-in small GPT-2.

Knows nothing of DSEE. Under ZeRO-3 the model is created partitioned through transformers' own
DeepSpeed integration (`HfDeepSpeedConfig` alive before `from_pretrained`), so no rank ever holds
the full model. A bare `deepspeed.zero.Init` around a transformers 5 model leaves weights wrongly
initialised (METHOD.md §4); tests/distributed checks the loaded weights against the files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dsee_dist.config.schema import BUILTIN_MODELS
from dsee_dist.utils.files import atomic_directory

BUILTIN_MARKER = "dsee_builtin.json"

# Keeps transformers' DeepSpeed integration alive while ZeRO-3 models are created (it is a weakref there).
_HF_DS_CONFIG = None


def import_model_code() -> None:
    """Import transformers' shared modeling code (`modeling_utils`: ~4 s on a CPU core) in this process."""
    import transformers.modeling_utils  # noqa: F401


def build_builtin_model(name: str, vocab_size: int, seed: int):
    """A randomly initialised GPT-2 of the named shape (seeded, identical on every rank and machine)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = BUILTIN_MODELS[name]
    config = GPT2Config(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0, **shape)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def materialize_builtin_model(name: str, tokenizer, seed: int, target_dir: str | os.PathLike) -> Path:
    """Write the built-in model and its tokenizer as an ordinary HF directory (atomically).

    Called on rank 0 only; the directory is then loaded like any pretrained model. Reused when it
    already holds the same model (same name, seed and tokenizer vocabulary).
    """
    target = Path(target_dir)
    marker = {"name": name, "seed": seed, "vocab_size": len(tokenizer), "shape": BUILTIN_MODELS[name]}
    if (target / BUILTIN_MARKER).is_file() and json.loads((target / BUILTIN_MARKER).read_text()) == marker:
        return target
    model = build_builtin_model(name, len(tokenizer), seed)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / BUILTIN_MARKER).write_text(json.dumps(marker, indent=1))
    return target


GGUF_MARKER = "dsee_gguf.json"


def gguf_path(model_path: str | os.PathLike, gguf_file: str) -> Path:
    """The GGUF file: `gguf_file` inside `model_path` (a directory), or `gguf_file` itself if absolute."""
    path = Path(gguf_file) if Path(gguf_file).is_absolute() else Path(model_path) / gguf_file
    if not path.is_file():
        from dsee_dist.errors import DSEEError

        raise DSEEError(
            f"GGUF file '{path}' does not exist; set model.path to its directory and model.gguf_file to "
            f"its name (for SmolLM2: dsee-dist models fetch smollm2 DIR writes a ready directory)"
        )
    return path


def materialize_gguf_model(
    gguf_file: str | os.PathLike,
    target_dir: str | os.PathLike,
    *,
    dtype_name: str = "float32",
    source: str | None = None,
) -> Path:
    """Dequantise a GGUF checkpoint (transformers' own GGUF loading, the `gguf` package) into an ordinary
    Hugging Face directory: safetensors weights, config, tokenizer with its chat template. Atomic; reused
    when the directory already holds the same file (name, size, mtime, dtype)."""
    import torch

    from dsee_dist.errors import DSEEError

    gguf_file, target = Path(gguf_file), Path(target_dir)
    stat = gguf_file.stat()
    marker = {
        "gguf_file": gguf_file.name,
        "size": stat.st_size,
        "mtime": int(stat.st_mtime),
        "dtype": dtype_name,
        "source": source,
    }
    if (target / GGUF_MARKER).is_file() and json.loads((target / GGUF_MARKER).read_text()) == marker:
        return target
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files through it
    except ImportError:
        raise DSEEError("reading GGUF files needs the gguf package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=getattr(torch, dtype_name)
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise DSEEError(
            f"cannot read GGUF file '{gguf_file}' ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"is it a complete GGUF checkpoint of an architecture transformers supports?"
        ) from None
    # the weights are dequantised now: an ordinary checkpoint, not a quantised one
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_MARKER).write_text(json.dumps(marker, indent=1))
    return target


DROPOUT_KEYS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
)


def load_model(path: str | os.PathLike, ds_config: dict | None = None, dropout: float | None = None):
    """Load a causal LM from a local directory (or hub name), partitioned at creation under ZeRO-3.

    `dropout` (if not None) replaces every dropout probability the model's config defines."""
    import torch
    from transformers import AutoModelForCausalLM

    from dsee_dist.models.pruned_gpt2 import register

    register()  # structurally pruned bases (stage 2) load without remote code
    global _HF_DS_CONFIG
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    dtype = torch.bfloat16 if (ds_config or {}).get("bf16", {}).get("enabled") else torch.float32
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    else:
        _HF_DS_CONFIG = None
    overrides = {}
    if dropout is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
        overrides = {key: dropout for key in DROPOUT_KEYS if isinstance(getattr(config, key, None), float)}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **overrides)
    model.config.use_cache = False
    return model


def end_zero3_init() -> None:
    """Models created from now on are ordinary (whole) models, e.g. for an export after a ZeRO-3 run."""
    global _HF_DS_CONFIG
    _HF_DS_CONFIG = None


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
