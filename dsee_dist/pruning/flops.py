"""Inference FLOPs per token of a GPT-2-style model (dense or structurally pruned).

One multiply-add = 2 FLOPs. For a token attending to `context` positions, block l costs
    q/k/v projections 2 * d * 3w,  attention scores and weighted sum 2 * 2 * w * context,
    output projection 2 * w * d,   MLP 2 * 2 * d * inner,
with w = heads_l * head_dim; the LM head costs 2 * d * vocab. Layer norms, biases, softmax and the
activation are a few d per token and left out. Unstructured sparsity is not counted as saved: dense
kernels do the same work (report it from the sparsity figures instead).
"""

from __future__ import annotations

from dsee_dist.pruning.targets import gpt2_shape


def flops_per_token(config, context: int = 128) -> dict:
    shape = gpt2_shape(config)
    d = shape["n_embd"]
    blocks = []
    for heads, inner in zip(shape["heads"], shape["inner"]):
        w = heads * shape["head_dim"]
        parts = {"qkv": 2 * d * 3 * w, "attention": 2 * 2 * w * context, "attn_out": 2 * w * d, "mlp": 2 * 2 * d * inner}
        blocks.append({**parts, "total": sum(parts.values())})
    blocks_total = sum(b["total"] for b in blocks)
    lm_head = 2 * d * config.vocab_size
    return {"context": context, "blocks": blocks, "blocks_total": blocks_total, "lm_head": lm_head,
            "total": blocks_total + lm_head}


def compare(dense: dict, pruned: dict) -> dict:
    """Fractions of FLOPs saved, for the transformer blocks and for the whole model."""
    return {"blocks_saved": 1.0 - pruned["blocks_total"] / dense["blocks_total"],
            "total_saved": 1.0 - pruned["total"] / dense["total"]}


def format_report(name: str, report: dict) -> str:
    lines = [f"{name}: {report['total'] / 1e6:.2f} MFLOPs per token at context {report['context']} "
             f"(blocks {report['blocks_total'] / 1e6:.2f}, LM head {report['lm_head'] / 1e6:.2f})"]
    for i, block in enumerate(report["blocks"]):
        lines.append(f"  block {i:>2}: {block['total'] / 1e6:8.3f} M (qkv {block['qkv'] / 1e6:.3f}, attention "
                     f"{block['attention'] / 1e6:.3f}, out {block['attn_out'] / 1e6:.3f}, mlp {block['mlp'] / 1e6:.3f})")
    return "\n".join(lines)
