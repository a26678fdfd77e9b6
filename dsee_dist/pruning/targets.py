"""The prunable matrices of a GPT-2-style model, named by kind, and where they live in the weight files.

Kinds: attn_q, attn_k, attn_v (the thirds of the fused `c_attn`), attn_out (`attn.c_proj`), mlp_in
(`mlp.c_fc`), mlp_out (`mlp.c_proj`). Embeddings, layer norms and the LM head are never prunable.
All matrices use the (out x in) convention; GPT-2's Conv1D stores (in x out) and is transposed at the
edges (`file_to_out_in` / `out_in_to_file`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsee_dist.config import PRUNE_MODULE_KINDS
from dsee_dist.errors import ConfigError

KINDS = PRUNE_MODULE_KINDS
MODULE_OF_KIND = {"attn_q": "attn.c_attn", "attn_k": "attn.c_attn", "attn_v": "attn.c_attn",
                  "attn_out": "attn.c_proj", "mlp_in": "mlp.c_fc", "mlp_out": "mlp.c_proj"}
QKV = ("attn_q", "attn_k", "attn_v")


@dataclass(frozen=True)
class PrunableMatrix:
    name: str  # e.g. transformer.h.3.attn.c_attn.q
    module: str  # e.g. transformer.h.3.attn.c_attn
    kind: str
    layer: int
    rows: tuple[int, int]  # (first row, number of rows) in the module's (out x in) weight
    in_features: int

    @property
    def numel(self) -> int:
        return self.rows[1] * self.in_features


def gpt2_shape(config) -> dict:
    """n_layer, n_embd, heads and widths per layer of a GPT2Config (or the pruned variant)."""
    if getattr(config, "model_type", "") not in ("gpt2", "dsee_pruned_gpt2"):
        raise ConfigError(f"pruning supports GPT-2-style models (model_type gpt2); this model is "
                          f"'{getattr(config, 'model_type', '?')}'")
    n_embd, n_layer = config.n_embd, config.n_layer
    head_dim = getattr(config, "head_dim", None) or n_embd // config.n_head
    heads = list(getattr(config, "heads_per_layer", None) or [config.n_head] * n_layer)
    inner = list(getattr(config, "inner_per_layer", None) or [config.n_inner or 4 * n_embd] * n_layer)
    return {"n_layer": n_layer, "n_embd": n_embd, "head_dim": head_dim, "heads": heads, "inner": inner}


def prunable_matrices(config, kinds: list[str], prefix: str = "transformer.") -> list[PrunableMatrix]:
    """Every matrix of the requested kinds, in model order (the global order ties are broken in)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"prune.modules: '{unknown[0]}' is not a prunable module kind; choose from: " + ", ".join(KINDS))
    shape = gpt2_shape(config)
    d = shape["n_embd"]
    out = []
    for layer in range(shape["n_layer"]):
        width = shape["heads"][layer] * shape["head_dim"]
        inner = shape["inner"][layer]
        geometry = {"attn_q": ((0, width), d), "attn_k": ((width, width), d), "attn_v": ((2 * width, width), d),
                    "attn_out": ((0, d), width), "mlp_in": ((0, inner), d), "mlp_out": ((0, d), inner)}
        for kind in KINDS:
            if kind not in kinds:
                continue
            module = f"{prefix}h.{layer}.{MODULE_OF_KIND[kind]}"
            rows, in_features = geometry[kind]
            name = module + ("." + kind[-1] if kind in QKV else "")
            out.append(PrunableMatrix(name, module, kind, layer, rows, in_features))
    return out


def file_to_out_in(tensor: torch.Tensor) -> torch.Tensor:
    """A Conv1D weight as stored (in x out) -> (out x in)."""
    return tensor.t()


def out_in_to_file(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t().contiguous()
