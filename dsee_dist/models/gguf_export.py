"""A Llama-family model (llama, mistral, qwen2; SmolLM2) as one GGUF file for llama.cpp / ollama.

    write_gguf(model, tokenizer, Path("out/model.gguf"), "q8_0")

Written with the `gguf` package, by its own names: tensor names from its tensor-name map (`blk.N.attn_q`...),
metadata under its `Keys` (`llama.attention.head_count_kv`...), as llama.cpp's `convert_hf_to_gguf.py` writes
them:

- llama and mistral go to the `llama` architecture, whose q and k rows llama.cpp expects in its own order:
  within each head, the two rotary halves interleaved (`permute_qk`; transformers' GGUF loader undoes it).
  qwen2 goes to `qwen2` (rotary by halves, as in transformers: no permutation), q/k/v biases included.
- A structurally pruned export (fewer heads, narrower MLP; dsee_dist.pruning.structured) is a stock config
  with head_dim no longer hidden / heads: the head counts, `attention.key_length` / `value_length` and
  `rope.dimension_count` (= head_dim, which transformers reads back as head_dim) and `feed_forward_length`
  say so.
- The tokenizer goes in as llama.cpp's `gpt2` (byte-level BPE) vocabulary: tokens in id order (added tokens
  CONTROL when special, else USER_DEFINED; padded to the embedding's rows as UNUSED `[PADi]`), merges, the
  pre-tokenizer by the name llama.cpp knows it under, bos/eos/unk/pad ids, whether bos/eos are added, and the
  chat template.
- Types: f32 everything; f16 every matrix (norms and biases stay f32, as llama.cpp keeps them); q8_0 every
  matrix whose rows are a multiple of 32 long (others f16, as llama.cpp falls back).

Anything else (another family, a SentencePiece tokenizer, scaled rotary positions, an activation other than
SiLU) is refused with one line before anything is written. The file is written to `<name>.partial` and
renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from dsee_dist.errors import DSEEError
from dsee_dist.models.families import LLAMA, QWEN2
from dsee_dist.models.shape import ModelShape, model_shape

GGUF_TYPES = ("f32", "f16", "q8_0")
# model_type -> llama.cpp architecture: the Llama family's types (llama, mistral) are `llama`, Qwen2 is `qwen2`.
GGUF_ARCHES = {**dict.fromkeys(LLAMA.model_types, "llama"), **dict.fromkeys(QWEN2.model_types, "qwen2")}
Q8_BLOCK = 32

# tokenizer.json pre-tokenizers by the name llama.cpp gives them (`tokenizer.ggml.pre`); the split regexes are
# the ones transformers' GGUF reader maps those names back to.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def gguf_arch(config) -> str:
    """llama.cpp's architecture name for a model config, or a one-line DSEEError."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHES:
        raise DSEEError(
            f"GGUF export writes Llama-family models ({', '.join(GGUF_ARCHES)}), and model_type '{model_type}' "
            f"is not one; export it with --merged and convert it with llama.cpp's own convert_hf_to_gguf.py"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise DSEEError(f"GGUF export: hidden_act '{act}' is not SiLU, which llama.cpp's {model_type} graph uses")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise DSEEError(f"GGUF export: rotary scaling '{rope_type}' is not written yet (only unscaled RoPE)")
    return GGUF_ARCHES[model_type]


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for a Llama q or k weight (or bias): per head, rows [x0..x_{d/2-1}, y0..] (the
    halves transformers rotates) become [x0, y0, x1, y1, ...] (the pairs llama.cpp's rotary mode rotates)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """The `tokenizer.ggml.pre` of a tokenizer.json pre-tokenizer, or None when llama.cpp has no name for it."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") != "Sequence":
        return None
    parts = pre.get("pretokenizers", [])
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return SPLIT_PRE_TOKENIZERS.get(parts[0].get("pattern", {}).get("Regex"))
    return None


def tokenizer_metadata(tokenizer, n_vocab: int) -> dict:
    """What llama.cpp's `gpt2` vocabulary needs, from a transformers fast tokenizer (a one-line DSEEError for
    one it cannot express)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DSEEError("GGUF export needs a fast (tokenizer.json) tokenizer beside the model")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise DSEEError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 / SmolLM2 / Qwen2 / Llama-3 style), and this one is "
            f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''} "
            "(SentencePiece-style); convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise DSEEError(
            f"GGUF export: the tokenizer's pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))[:120]}) is not one "
            "llama.cpp names (gpt-2, smollm, llama-bpe, qwen2)"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise DSEEError(f"GGUF export: the tokenizer has id {max(vocab.values())}, the embedding only {n_vocab} rows")
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [5] * n_vocab  # 5: UNUSED
    for token, i in vocab.items():
        tokens[i], types[i] = token, 1  # NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < n_vocab:
            types[i] = 3 if added.special else 4  # CONTROL, USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "ids": {k: v for k, v in ids.items() if v is not None and v < n_vocab},
        "add_bos": bool(probe) and ids["bos"] is not None and probe[0] == ids["bos"],
        "add_eos": len(probe) > 1 and ids["eos"] is not None and probe[-1] == ids["eos"],
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def _tensor_data(tensor: torch.Tensor, gguf_type: str):
    """(numpy data, raw ggml type or None) of one tensor in the requested type."""
    from gguf import GGMLQuantizationType, quants

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or gguf_type == "f32":
        return data, None
    if gguf_type == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def _add_model_metadata(writer, config, shape: ModelShape, n_vocab: int, gguf_type: str, name: str | None) -> None:
    """The model's name, file type and shape under gguf's keys."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    name = name or Path(getattr(config, "_name_or_path", "") or config.model_type).name
    # transformers' GGUF reader takes a `llama` file whose name is exactly "mistral" for a mistral architecture
    # that gguf has no tensor names for; a Mistral is a Llama to llama.cpp.
    writer.add_name(name if name != "mistral" else "mistral-dsee")
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[gguf_type]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.inner[0])
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_kv_head)
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != shape.hidden // shape.n_head:  # a pruned model: heads no longer split hidden_size
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _add_tokenizer(writer, tok: dict) -> None:
    """llama.cpp's `gpt2` vocabulary from `tokenizer_metadata`."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if tok["merges"]:
        writer.add_token_merges(tok["merges"])
    for key, token_id in tok["ids"].items():
        getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def _add_tensors(writer, state: dict, config, shape: ModelShape, arch: str, gguf_type: str) -> int:
    """Every tensor under its GGUF name (a tied LM head and rotary buffers left out; llama's q and k rows in
    llama.cpp's order); returns how many were added."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, shape.n_layer)
    count = 0
    for key, tensor in state.items():
        if (key == "lm_head.weight" and shape.tied_embeddings) or key.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise DSEEError(f"GGUF export: no GGUF name for tensor '{key}' of this {config.model_type} model")
        if arch == "llama" and ".self_attn.q_proj." in key:
            tensor = permute_qk(tensor, shape.n_head)
        elif arch == "llama" and ".self_attn.k_proj." in key:
            tensor = permute_qk(tensor, shape.n_kv_head)
        data, raw = _tensor_data(tensor, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        count += 1
    return count


def _write_file(writer, tmp: Path, target: Path) -> None:
    """Header, metadata and tensors to `tmp` (removed on any failure), then renamed to `target`."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, target)


def write_gguf(model, tokenizer, target: Path, gguf_type: str = "f16", name: str | None = None) -> dict:
    """Write `model` (a transformers Llama-family causal LM, any dtype) and `tokenizer` to `target`; returns a
    summary (architecture, type, tensors, bytes)."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise DSEEError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, not '{gguf_type}'")
    config = model.config
    arch = gguf_arch(config)
    shape = model_shape(config, purpose="GGUF export")
    state = model.state_dict()
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    tok = tokenizer_metadata(tokenizer, n_vocab)  # refuses a tokenizer llama.cpp cannot read before writing

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _add_model_metadata(writer, config, shape, n_vocab, gguf_type, name)
    _add_tokenizer(writer, tok)
    count = _add_tensors(writer, state, config, shape, arch, gguf_type)
    _write_file(writer, tmp, target)
    return {"arch": arch, "type": gguf_type, "tensors": count, "bytes": target.stat().st_size}
