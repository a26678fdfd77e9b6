"""The one description of a decoder's shape: layer count, widths, per-layer head counts and MLP widths, and the
projections they make, built from the family data (`models/families.py`) and a transformers config.

Used by DSEE injection, both prunings and the pruned exports (`ModelShape`, `model_shape`), the GGUF export, the
memory plan (`engine/memory.py`: `linear_modules`, `parameter_count`) and the FLOPs count behind the pruning
reports and MFU (`models/flops.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsee_dist.models.families import QKV, Family, family_of


@dataclass(frozen=True)
class LinearModule:
    """One projection of the model: its name, shape, and which activation is its input (`input_name`: modules
    with the same input name read the same tensor: attn_norm, attn_out, mlp_norm, mlp_act, final_norm)."""

    name: str
    in_features: int
    out_features: int
    input_name: str
    bias: bool
    layer: int  # -1 for the LM head


@dataclass(frozen=True)
class ModelShape:
    """Layer count, widths and per-layer head counts / MLP widths of one model, and what its blocks are made of."""

    family: Family
    n_layer: int
    hidden: int
    head_dim: int
    heads: tuple[int, ...]  # query heads per layer
    kv_heads: tuple[int, ...]  # key/value heads per layer (= heads without GQA)
    inner: tuple[int, ...]  # MLP width per layer
    vocab: int
    positions: int = 0  # rows of a learned position table (0: rotary positions)
    tied_embeddings: bool = False
    activation: str = ""
    dropout: float = 0.0  # residual dropout in training
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False

    @property
    def n_head(self) -> int:
        """Query heads of the first layer (of every layer in a stock config)."""
        return self.heads[0]

    @property
    def n_kv_head(self) -> int:
        return self.kv_heads[0]

    def q_width(self, layer: int) -> int:
        return self.heads[layer] * self.head_dim

    def kv_width(self, layer: int) -> int:
        return self.kv_heads[layer] * self.head_dim

    def module_name(self, layer: int, relative: str) -> str:
        """The full name of a block's module (`relative` as the family names it)."""
        return f"{self.family.layers}.{layer}.{relative}"

    def qkv_rows(self, layer: int) -> dict[str, tuple]:
        """Slice tuples of q, k, v in their module's (out x in) weight (in a fused one: its part)."""
        hd, qw, kw = self.head_dim, self.q_width(layer), self.kv_width(layer)
        if self.family.fused_qkv == "blocked":
            return {"attn_q": (0, qw), "attn_k": (qw, kw), "attn_v": (qw + kw, kw)}
        if self.family.fused_qkv == "interleaved":
            return {kind: (i * hd, qw, hd, 3 * hd) for i, kind in enumerate(QKV)}
        return {"attn_q": (0, qw), "attn_k": (0, kw), "attn_v": (0, kw)}

    def matrix_geometry(self, layer: int) -> dict[str, tuple[tuple, int]]:
        """kind -> (rows slice tuple, in_features) of each prunable matrix of a layer."""
        d, qw, inner = self.hidden, self.q_width(layer), self.inner[layer]
        rows = self.qkv_rows(layer)
        return {
            **{kind: (rows[kind], d) for kind in QKV},
            "attn_out": ((0, d), qw),
            "mlp_in": ((0, inner), d),
            "mlp_out": ((0, d), inner),
        }


def _get(config, key: str | None):
    return getattr(config, key, None) if key else None


def _flag(config, key: str | bool) -> bool:
    """A family's bias entry: a constant, or a config key (absent or None = False)."""
    return key if isinstance(key, bool) else bool(_get(config, key))


def _as_config(config):
    """A transformers config for a config.json dict (its defaults filled in as transformers fills them)."""
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig

    return AutoConfig.for_model(**config)


def model_shape(config, purpose: str = "pruning") -> ModelShape:
    """The shape of a model from its HF config or config.json dict (also a structurally pruned GPT-2's per-layer
    config); a ConfigError naming `purpose` for a model of no known family."""
    family = family_of(config, purpose=purpose)
    config = _as_config(config)
    hidden, n_layer = _get(config, family.hidden_key), _get(config, family.layers_key)
    n_heads = _get(config, family.heads_key)
    head_dim = _get(config, family.head_dim_key) or hidden // n_heads
    heads = tuple(getattr(config, "heads_per_layer", None) or [n_heads] * n_layer)
    n_kv = _get(config, family.kv_heads_key) or n_heads
    kv_heads = heads if n_kv == n_heads and family.kv_heads_key is None else tuple([n_kv] * n_layer)
    inner_default = _get(config, family.inner_key) or 4 * hidden
    inner = tuple(getattr(config, "inner_per_layer", None) or [inner_default] * n_layer)
    positions = _get(config, family.positions_key)
    return ModelShape(
        family,
        n_layer,
        hidden,
        head_dim,
        heads,
        kv_heads,
        inner,
        config.vocab_size,
        positions=positions + family.positions_offset if positions else 0,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        activation=_get(config, family.activation_key) or "",
        dropout=float(_get(config, family.dropout_key) or 0.0),
        qkv_bias=_flag(config, family.qkv_bias),
        out_bias=_flag(config, family.out_bias),
        mlp_bias=_flag(config, family.mlp_bias),
    )


def _block_modules(shape: ModelShape, layer: int) -> list[LinearModule]:
    family, h, ff = shape.family, shape.hidden, shape.inner[layer]
    qw, kw = shape.q_width(layer), shape.kv_width(layer)

    def linear(relative: str, n_in: int, n_out: int, input_name: str, bias: bool) -> LinearModule:
        return LinearModule(shape.module_name(layer, relative), n_in, n_out, input_name, bias, layer)

    if family.is_fused():
        mods = [linear(family.q, h, qw + 2 * kw, "attn_norm", shape.qkv_bias)]
    else:
        mods = [
            linear(relative, h, width, "attn_norm", shape.qkv_bias)
            for relative, width in ((family.q, qw), (family.k, kw), (family.v, kw))
        ]
    mods.append(linear(family.o, qw, h, "attn_out", shape.out_bias))
    mods += [linear(rel, h, ff, "mlp_norm", shape.mlp_bias) for rel in (family.mlp_gate, family.mlp_in) if rel]
    mods.append(linear(family.mlp_out, ff, h, "mlp_act", shape.mlp_bias))
    return mods


def linear_modules(shape: ModelShape) -> list[LinearModule]:
    """Every projection in model order, named as in transformers (transformer.h.N.attn.c_attn, ...;
    model.layers.N.self_attn.q_proj, ...), and the LM head (also where it is tied to the embeddings). OPT with
    word_embed_proj_dim != hidden_size has two more projections (project_in/out), not listed."""
    mods = [m for layer in range(shape.n_layer) for m in _block_modules(shape, layer)]
    mods.append(LinearModule("lm_head", shape.hidden, shape.vocab, "final_norm", False, -1))
    return mods


def linear_parameter_count(shape: ModelShape) -> int:
    """Weights and biases of every projection, the LM head counted only where it is not tied to the embeddings."""
    linears = [m for m in linear_modules(shape) if not (m.layer == -1 and shape.tied_embeddings)]
    return sum(m.in_features * m.out_features + (m.out_features if m.bias else 0) for m in linears)


def parameter_count(shape: ModelShape) -> int:
    """All parameters of the model (tied embeddings counted once), as transformers builds it: projections, token
    and position embeddings, and two norms per block plus the final one."""
    h = shape.hidden
    norm = 2 * h if shape.family.norm == "layernorm" else h
    return linear_parameter_count(shape) + (shape.vocab + shape.positions) * h + (2 * shape.n_layer + 1) * norm
