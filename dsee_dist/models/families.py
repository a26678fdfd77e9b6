"""Decoder families as data: where the attention and MLP projections of a block live, how a fused q/k/v
projection is laid out, where the shapes are in the Hugging Face config, and what the block is made of (norms,
biases, activation, position table).

`dsee_dist.models.shape` turns a family and a config into the one description of a model's shape, which DSEE
injection (`dsee.target_modules: auto` adapts the family's q and v), both prunings, the FLOPs count, the memory
plan and the exports use. All row layouts use the (out x in) convention.

Fused q/k/v layouts:
- `blocked` (GPT-2 `c_attn`): rows [q | k | v], each `heads * head_dim` rows;
- `interleaved` (GPT-NeoX `query_key_value`): per head h, rows [q_h | k_h | v_h] of `head_dim` each, so
  q is every third block of `head_dim` rows.
A row set is written as a slice tuple: (start, size) for contiguous rows, or (start, size, block, stride)
for `size` rows taken `block` at a time every `stride` rows (NeoX q: (0, H*hd, hd, 3*hd)).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsee_dist.config.schema import PRUNE_MODULE_KINDS
from dsee_dist.errors import ConfigError

# The prunable matrix kinds (prune.modules, whose Literal in config/schema.py is the one list); attn_q/k/v are
# slices of a fused projection where one exists.
KINDS: tuple[str, ...] = PRUNE_MODULE_KINDS
QKV = KINDS[:3]  # attn_q, attn_k, attn_v


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
    # What the block is made of, for parameter counts and the memory plan. A bias is a config key (absent or
    # None = no bias) or a constant; `positions_key` names a learned position table (None: rotary positions),
    # `positions_offset` the rows it has beyond that (OPT's 2).
    norm: str = "layernorm"  # "layernorm" (weight and bias) or "rmsnorm" (weight)
    qkv_bias: str | bool = False
    out_bias: str | bool = False
    mlp_bias: str | bool = False
    activation_key: str = "hidden_act"
    dropout_key: str | None = None  # residual dropout
    positions_key: str | None = None
    positions_offset: int = 0

    def __str__(self) -> str:
        return self.name

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
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    activation_key="activation_function",
    dropout_key="resid_pdrop",
    positions_key="n_positions",
)
LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral"),
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
    norm="rmsnorm",
    qkv_bias="attention_bias",  # Mistral's config has no such key: no biases
    out_bias="attention_bias",
    mlp_bias="mlp_bias",
)
# A Llama block whose q, k and v always carry a bias (and o and the MLP never).
QWEN2 = dataclasses.replace(LLAMA, name="qwen2", model_types=("qwen2",), qkv_bias=True, out_bias=False, mlp_bias=False)
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
    qkv_bias="enable_bias",
    out_bias="enable_bias",
    mlp_bias="enable_bias",
    activation_key="activation_function",
    dropout_key="dropout",
    positions_key="max_position_embeddings",
    positions_offset=2,
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
    qkv_bias="attention_bias",
    out_bias="attention_bias",
    mlp_bias=True,
    dropout_key="hidden_dropout",
)
FAMILIES = (GPT2, LLAMA, QWEN2, OPT, GPT_NEOX)
SUPPORTED_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(config, *, required: bool = True, purpose: str = "this") -> Family | None:
    """The family of a model config or config.json dict (by model_type); None or a ConfigError for an unknown
    one."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
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
