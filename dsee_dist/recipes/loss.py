"""The training loss: the sum of next-token cross-entropies over the labelled tokens of a micro-batch.

- `token_loss_sum(model, batch, dev)`: the model's logits for every position, then one fp32 cross-entropy (at its
  peak about three fp32 copies of the logits are alive: 12 bytes per position per vocabulary entry).
- `token_loss_sum(..., chunk_tokens=C)`: the model runs without its LM head; the head and the cross-entropy are
  applied to C positions at a time, each chunk under activation checkpointing (non-reentrant), so forward keeps
  only the final hidden states and backward recomputes one chunk's logits at a time. Full fp32 logits for the
  whole micro-batch never exist. The loss and the gradients equal the plain loss's (up to summation order).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _sum_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@contextlib.contextmanager
def _head_as_identity(head: torch.nn.Module):
    """The model's forward returns its final hidden states as `logits`: the head's own forward is skipped (its
    module hooks, e.g. ZeRO-3's, still run)."""
    patched_before = head.__dict__.get("forward")
    head.forward = lambda hidden, *args, **kwargs: hidden
    try:
        yield
    finally:
        if patched_before is None:
            del head.forward
        else:
            head.forward = patched_before


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _sum_cross_entropy(head(hidden), labels)


def chunked_loss_sum(
    head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Sum of cross-entropies of `head(hidden)` against `labels` (both already shifted), `chunk_tokens` positions
    at a time; positions with no label are skipped entirely."""
    flat_hidden = hidden.flatten(0, -2)
    flat_labels = labels.flatten()
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    flat_hidden, flat_labels = flat_hidden.index_select(0, keep), flat_labels.index_select(0, keep)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_labels.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, head, flat_hidden[part], flat_labels[part], use_reentrant=False)
    return total


def token_loss_sum(model, batch: dict, dev, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over the labelled tokens, their count as a tensor), for one micro-batch.
    `model` is the DeepSpeed engine (or any module returning `.logits`); `chunk_tokens` > 0 chunks the loss."""
    labels = batch["labels"][:, 1:].to(dev, non_blocking=True)
    inputs = dict(
        input_ids=batch["input_ids"].to(dev, non_blocking=True),
        attention_mask=batch["attention_mask"].to(dev, non_blocking=True),
    )
    count = (labels != IGNORE_INDEX).sum()
    if not chunk_tokens:
        logits = model(**inputs).logits
        return _sum_cross_entropy(logits[:, :-1], labels), count
    module = getattr(model, "module", model)
    head = module.get_output_embeddings()
    with _head_as_identity(head):
        hidden = model(**inputs).logits
    return chunked_loss_sum(head, hidden[:, :-1], labels, chunk_tokens), count
