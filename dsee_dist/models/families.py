"""Decoder families as data: where the attention and MLP projections of a block live, how a fused q/k/v
projection is laid out, and where the shapes are in the Hugging Face config.

Used by DSEE injection (`dsee.target_modules: auto` adapts the family's q and v), both prunings, the FLOPs
count and the pruned exports. All row layouts use the (out x in) convention.

Fused q/k/v layouts:
- `blocked` (GPT-2 `c_attn`): rows [q | k | v], each `heads * head_dim` rows;
- `interleaved` (GPT-NeoX `query_key_value`): per head h, rows [q_h | k_h | v_h] of `head_dim` each, so
  q is every third block of `head_dim` rows.
A row set is written as a slice tuple: (start, size) for contiguous rows, or (start, size, block, stride)
for `size` rows taken `block` at a time every `stride` rows (NeoX q: (0, H*hd, hd, 3*hd)).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsee_dist.errors import ConfigError

# The prunable matrix kinds (prune.modules); attn_q/k/v are slices of a fused projection where one exists.
KINDS = ("attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_out")
QKV = ("attn_q", "attn_k", "attn_v")


@dataclass(frozen=True)
class Family:
    """One decoder family. Module names are relative to a block (`<layers>.<i>.`)."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # the block list, from the model root (AutoModelForCausalLM)
    q: str
    k: str
    v: str
    o: str
    mlp_in: str  # up projection (`up_proj`, `c_fc`, `fc1`, `dense_h_to_4h`)
    mlp_out: str
    mlp_gate: str | None = None  # SwiGLU gate (pruned with mlp_in rows)
    fused_qkv: str | None = None  # None, "blocked" or "interleaved"
    conv1d: bool = False  # weights stored (in x out), GPT-2's Conv1D
    # Where the shapes are in the config (attribute names; None = derived).
    hidden_key: str = "hidden_size"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = None  # GQA; None = as many KV heads as query heads
    inner_key: str | None = "intermediate_size"  # None or unset value -> 4 * hidden
    layers_key: str = "num_hidden_layers"
    head_dim_key: str | None = None  # an explicit head width in the config (Llama's head_dim)
    # How a structurally pruned model is written: "llama" (num_attention_heads/head_dim/intermediate_size
    # in the stock config), "gpt2" (n_inner, or the per-layer PrunedGPT2 model), or None (MLP width only).
    structured_config: str | None = None
    # Whether packed rows (data.packing) stay apart: transformers builds per-example causal masks from restarting
    # position ids; OPT's decoder makes an all-ones padding mask of its own first, which turns that off.
    packing: bool = True

    def is_fused(self) -> bool:
        return self.fused_qkv is not None

    def module_of_kind(self, kind: str) -> str:
        return {
            "attn_q": self.q,
            "attn_k": self.k,
            "attn_v": self.v,
            "attn_out": self.o,
            "mlp_in": self.mlp_in,
            "mlp_out": self.mlp_out,
        }[kind]

    def auto_targets(self) -> tuple[list[str], list[str]]:
        """(target_modules, fused_slices) for `dsee.target_modules: auto`: the query and value projections."""
        if self.is_fused():
            return [self.q], ["q", "v"]
        return [self.q, self.v], []


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2", "dsee_pruned_gpt2"),
    layers="transformer.h",
    q="attn.c_attn",
    k="attn.c_attn",
    v="attn.c_attn",
    o="attn.c_proj",
    mlp_in="mlp.c_fc",
    mlp_out="mlp.c_proj",
    fused_qkv="blocked",
    conv1d=True,
    hidden_key="n_embd",
    heads_key="n_head",
    inner_key="n_inner",
    layers_key="n_layer",
    head_dim_key="head_dim",
    structured_config="gpt2",
)
LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers="model.layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in="mlp.up_proj",
    mlp_gate="mlp.gate_proj",
    mlp_out="mlp.down_proj",
    kv_heads_key="num_key_value_heads",
    head_dim_key="head_dim",
    structured_config="llama",
)
OPT = Family(
    name="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    mlp_in="fc1",
    mlp_out="fc2",
    inner_key="ffn_dim",
    packing=False,
)
GPT_NEOX = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    q="attention.query_key_value",
    k="attention.query_key_value",
    v="attention.query_key_value",
    o="attention.dense",
    mlp_in="mlp.dense_h_to_4h",
    mlp_out="mlp.dense_4h_to_h",
    fused_qkv="interleaved",
)
FAMILIES = (GPT2, LLAMA, OPT, GPT_NEOX)
SUPPORTED_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(config, *, required: bool = True, purpose: str = "this") -> Family | None:
    """The family of a model config (by model_type); None or a ConfigError for an unknown one."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    if not required:
        return None
    raise ConfigError(
        f"{purpose} needs a known decoder family, and model_type '{model_type}' is not one "
        f"(known: {', '.join(SUPPORTED_TYPES)}); for DSEE alone, name the projections explicitly, "
        f"e.g. dsee.target_modules=[q_proj,v_proj] dsee.fused_slices=[]"
    )


@dataclass(frozen=True)
class ModelShape:
    """Layer count, widths and per-layer head counts / MLP widths of one model."""

    family: Family
    n_layer: int
    hidden: int
    head_dim: int
    heads: tuple[int, ...]  # query heads per layer
    kv_heads: tuple[int, ...]  # key/value heads per layer (= heads without GQA)
    inner: tuple[int, ...]  # MLP width per layer
    vocab_size: int

    def q_width(self, layer: int) -> int:
        return self.heads[layer] * self.head_dim

    def kv_width(self, layer: int) -> int:
        return self.kv_heads[layer] * self.head_dim

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


def model_shape(config, purpose: str = "pruning") -> ModelShape:
    """The shape of a model from its HF config (also a structurally pruned GPT-2's per-layer config)."""
    family = family_of(config, purpose=purpose)
    hidden, n_layer = _get(config, family.hidden_key), _get(config, family.layers_key)
    n_heads = _get(config, family.heads_key)
    head_dim = _get(config, family.head_dim_key) or hidden // n_heads
    heads = tuple(getattr(config, "heads_per_layer", None) or [n_heads] * n_layer)
    n_kv = _get(config, family.kv_heads_key) or n_heads
    kv_heads = heads if n_kv == n_heads and family.kv_heads_key is None else tuple([n_kv] * n_layer)
    inner_default = _get(config, family.inner_key) or 4 * hidden
    inner = tuple(getattr(config, "inner_per_layer", None) or [inner_default] * n_layer)
    return ModelShape(family, n_layer, hidden, head_dim, heads, kv_heads, inner, config.vocab_size)
