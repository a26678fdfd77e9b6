"""Inference FLOPs per token of a decoder of any known family (dense or structurally pruned), from its shape
(`models/shape.py`).

One multiply-add = 2 FLOPs. For a token attending to `context` positions, block l costs
    q projection 2 * d * wq,  k and v projections 2 * 2 * d * wkv  (GQA: wkv = kv_heads * head_dim),
    attention scores and weighted sum 2 * 2 * wq * context  (every query head, also under GQA),
    output projection 2 * wq * d,
    MLP 2 * 2 * d * inner, or 3 * 2 * d * inner with a SwiGLU gate (gate, up, down),
with wq = heads_l * head_dim; the LM head costs 2 * d * vocab. Norms, biases, softmax, rotary embeddings
and the activation are a few d per token and left out. Unstructured sparsity is not counted as saved:
dense kernels do the same work (report it from the sparsity figures instead).
"""

from __future__ import annotations

from dsee_dist.models.shape import model_shape


def flops_per_token(config, context: int = 128) -> dict:
    """Forward FLOPs per token of a model (HF config or config.json dict) attending to `context` positions: per
    block (qkv, attention, attn_out, mlp, total), the blocks' sum, the LM head, the total."""
    shape = model_shape(config, purpose="the FLOPs count")
    d = shape.hidden
    mlp_matrices = 3 if shape.family.mlp_gate else 2
    blocks = []
    for layer in range(shape.n_layer):
        wq, wkv = shape.q_width(layer), shape.kv_width(layer)
        parts = {
            "qkv": 2 * d * (wq + 2 * wkv),
            "attention": 2 * 2 * wq * context,
            "attn_out": 2 * wq * d,
            "mlp": mlp_matrices * 2 * d * shape.inner[layer],
        }
        blocks.append({**parts, "total": sum(parts.values())})
    blocks_total = sum(b["total"] for b in blocks)
    lm_head = 2 * d * shape.vocab
    return {
        "context": context,
        "blocks": blocks,
        "blocks_total": blocks_total,
        "lm_head": lm_head,
        "total": blocks_total + lm_head,
    }


def compare(dense: dict, pruned: dict) -> dict:
    """Fractions of FLOPs saved, for the transformer blocks and for the whole model."""
    return {
        "blocks_saved": 1.0 - pruned["blocks_total"] / dense["blocks_total"],
        "total_saved": 1.0 - pruned["total"] / dense["total"],
    }


def format_report(name: str, report: dict) -> str:
    lines = [
        f"{name}: {report['total'] / 1e6:.2f} MFLOPs per token at context {report['context']} "
        f"(blocks {report['blocks_total'] / 1e6:.2f}, LM head {report['lm_head'] / 1e6:.2f})"
    ]
    for i, block in enumerate(report["blocks"]):
        lines.append(
            f"  block {i:>2}: {block['total'] / 1e6:8.3f} M (qkv {block['qkv'] / 1e6:.3f}, attention "
            f"{block['attention'] / 1e6:.3f}, out {block['attn_out'] / 1e6:.3f}, mlp {block['mlp'] / 1e6:.3f})"
        )
    return "\n".join(lines)
