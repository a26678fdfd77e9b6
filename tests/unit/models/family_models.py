"""One tiny random model per decoder family (the table the family tests run over), and a stage-1 run on
disk for each: the base model directory and a trained-looking DSEE adapter on the family's `auto` targets."""

import copy
from pathlib import Path

import torch

from dsee_dist.config import DSEEConfig
from dsee_dist.dsee.adapter import save_adapter
from dsee_dist.dsee.inject import find_targets, inject_dsee
from dsee_dist.dsee.layer import slice_rows, weight_out_in
from dsee_dist.dsee.support import select_support
from dsee_dist.engine.process_group import DistInfo

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0)
VOCAB = 97


# kind -> (transformers config class, its arguments): the table every family test runs over.
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": (
        "GPT2Config",
        dict(
            n_layer=2,
            n_embd=32,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    # an odd head count, 3 KV heads (SmolLM2's layout, smaller)
    "llama_gqa": (
        "LlamaConfig",
        dict(
            hidden_size=72,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=64,
        ),
    ),
    # LlamaConfig wants hidden_size divisible by the heads left after pruning (3)
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=1,
        ),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            attention_dropout=0.0,
            hidden_dropout=0.0,
        ),
    ),
}
FAMILY_MODELS = tuple(FAMILY_CONFIGS)


def _config(kind: str):
    import transformers

    class_name, kwargs = FAMILY_CONFIGS[kind]
    return getattr(transformers, class_name)(vocab_size=VOCAB, attn_implementation="eager", **kwargs)


# Families whose config can express fewer heads (the others: MLP neurons only).
HEAD_PRUNABLE = ("gpt2", "llama_gqa", "llama", "mistral", "qwen2")


def tiny_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind))
    with torch.no_grad():  # non-trivial biases and norms, so slicing mistakes show in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batch(seed: int = 0, shape=(2, 10)) -> torch.Tensor:
    return torch.randint(2, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def magnitude_support(model, specs, num_sparse: int) -> dict[str, torch.Tensor]:
    support = {}
    for spec in specs:
        w = weight_out_in(model.get_submodule(spec.name)).detach()
        for rows, name in zip(spec.slices, spec.matrix_names()):
            support[name] = select_support(
                w[slice_rows(rows)], num_sparse, "magnitude", generator=torch.Generator().manual_seed(0)
            )
    return support


def stage1(tmp: Path, kind: str, targets="auto", fused="auto", num_sparse=6, seed=0):
    """(base model dir, adapter dir, the plain base model, the adapted model with random B and S)."""
    base = tiny_model(kind, seed)
    base_dir = tmp / "base"
    base.save_pretrained(base_dir)
    model = copy.deepcopy(base)
    specs = find_targets(model, targets, fused)
    inject_dsee(model, specs, magnitude_support(model, specs, num_sparse), rank=4, alpha=8, dropout=0.0, seed=seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_b", "sparse_values")):
                p.normal_(0, 0.2)
    cfg = DSEEConfig(
        lora_rank=4,
        lora_alpha=8,
        num_sparse=num_sparse,
        target_modules=[targets] if isinstance(targets, str) else list(targets),
        fused_slices=[] if fused == "auto" else list(fused),
    )
    save_adapter(model, tmp / "adapter", base_model=str(base_dir), dsee_cfg=cfg, is_rank_zero=True)
    return base_dir, tmp / "adapter", base, model.eval()
