"""GPT-2 with a per-layer number of attention heads and MLP width: the model a structured prune produces.

Plain GPT-2 cannot express it: `n_head` is global, the head width is n_embd / n_head, and current
transformers releases no longer carry `prune_heads`. This file is self-contained (torch and
transformers only), so it is also copied into every structurally pruned export, whose config.json
names it through `auto_map`; the export then loads with

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

or, without remote code, through `dsee_dist.pruned_gpt2.load_pruned_model(path)`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

MODEL_TYPE = "dsee_pruned_gpt2"


class PrunedGPT2Config(GPT2Config):
    """GPT2Config plus `heads_per_layer`, `inner_per_layer` and a fixed `head_dim`."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        heads_per_layer: list[int] | None = None,
        inner_per_layer: list[int] | None = None,
        head_dim: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        n_inner = self.n_inner if self.n_inner is not None else 4 * self.n_embd
        self.head_dim = head_dim if head_dim is not None else self.n_embd // self.n_head
        self.heads_per_layer = list(heads_per_layer) if heads_per_layer is not None else [self.n_head] * self.n_layer
        self.inner_per_layer = list(inner_per_layer) if inner_per_layer is not None else [n_inner] * self.n_layer
        if len(self.heads_per_layer) != self.n_layer or len(self.inner_per_layer) != self.n_layer:
            raise ValueError(f"heads_per_layer and inner_per_layer need {self.n_layer} entries (one per layer)")
        if min(self.heads_per_layer) < 1 or min(self.inner_per_layer) < 1:
            raise ValueError("every layer needs at least one head and one MLP neuron")


class PrunedGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT-2 whose block i has heads_per_layer[i] heads of width head_dim and an MLP of inner_per_layer[i]."""

    config_class = PrunedGPT2Config

    def __init__(self, config: PrunedGPT2Config):
        super().__init__(config)
        for block, heads, inner in zip(self.transformer.h, config.heads_per_layer, config.inner_per_layer):
            width = heads * config.head_dim
            attn = block.attn
            attn.num_heads, attn.head_dim, attn.split_size = heads, config.head_dim, width
            if width != config.n_embd:
                attn.c_attn = Conv1D(3 * width, config.n_embd)
                attn.c_proj = Conv1D(config.n_embd, width)
            if inner != block.mlp.c_fc.nf:
                block.mlp.c_fc = Conv1D(inner, config.n_embd)
                block.mlp.c_proj = Conv1D(config.n_embd, inner)
        self.post_init()


def register() -> None:
    """Make the Auto classes know the pruned model (no remote code needed inside dsee_dist)."""
    try:
        AutoConfig.register(MODEL_TYPE, PrunedGPT2Config)
        AutoModelForCausalLM.register(PrunedGPT2Config, PrunedGPT2LMHeadModel)
    except ValueError:  # already registered
        pass


def load_pruned_model(path, **kwargs):
    """Load a structurally pruned export (or any model the Auto classes know) without remote code."""
    register()
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
