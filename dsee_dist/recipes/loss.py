"""The training loss: the sum of next-token cross-entropies over the labelled tokens of a micro-batch.

- `token_loss_sum(model, batch, dev)`: the model's logits for every position, then one fp32 cross-entropy (at its
  peak about three fp32 copies of the logits are alive: 12 bytes per position per vocabulary entry).
- `token_loss_sum(..., chunk_tokens=C)`: the LM head's forward is replaced, for this one call, by
  `linear_cross_entropy`: the head's matrix product and the cross-entropy over C labelled positions at a time, whose
  gradients (for the hidden states, and for the head's weight where it is trainable) are computed chunk by chunk in
  forward. Full fp32 logits for the whole micro-batch never exist, backward recomputes nothing (3 matrix products of
  the head per chunk, as the plain loss), and the head is called once per micro-batch as in the plain loss, so
  ZeRO-3 gathers its partitioned weight once, on every rank alike (its hooks run around the replaced forward).
  The loss and the gradients equal the plain loss's (up to summation order).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dsee_dist.data.dataset import model_inputs

IGNORE_INDEX = -100


def _sum_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, labels), `chunk_tokens` rows at a time. Forward also
    computes the gradients (d loss / d logits = softmax - one-hot, one chunk at a time); backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, labels.numel(), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            rows, targets = hidden[part], labels[part]
            logits = F.linear(rows, weight, bias).float()
            log_norm = logits.logsumexp(-1, keepdim=True)
            total += (log_norm.squeeze(-1) - logits.gather(-1, targets[:, None]).squeeze(-1)).sum()
            if need_hidden or need_weight or need_bias:
                grad_logits = logits.sub_(log_norm).exp_()  # softmax, in place of the logits
                grad_logits[torch.arange(len(targets), device=targets.device), targets] -= 1.0
                grad_logits = grad_logits.to(hidden.dtype)
                if need_hidden:
                    grad_hidden[part] = grad_logits @ weight
                if need_weight:
                    grad_weight += (grad_logits.t() @ rows).float()
                if need_bias:
                    grad_bias += grad_logits.float().sum(0)
                del grad_logits
            del logits  # freed before the next chunk's are made
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
        ctx.grad_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [
            (next(saved) * grad_total).to(dtype) if needed else None
            for needed, dtype in zip(ctx.needs_input_grad[:3], ctx.grad_dtypes)
        ]
        return (*grads, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Sum of cross-entropies of `hidden @ weight.T (+ bias)` against `labels` (both already shifted),
    `chunk_tokens` positions at a time; positions with no label are skipped entirely."""
    flat_hidden = hidden.flatten(0, -2)
    flat_labels = labels.flatten()
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    flat_hidden, flat_labels = flat_hidden.index_select(0, keep), flat_labels.index_select(0, keep)
    return _LinearCrossEntropy.apply(flat_hidden, weight, bias, flat_labels, chunk_tokens)


@contextlib.contextmanager
def _head_computes_loss(head: torch.nn.Module, labels: torch.Tensor, chunk_tokens: int):
    """For one forward of the model, the head returns the chunked loss of its input (the final hidden states) as the
    model's `logits`. Its module hooks still run around it, e.g. ZeRO-3's gather before and release after."""
    patched_before = head.__dict__.get("forward")

    def loss_forward(hidden, *args, **kwargs):
        return linear_cross_entropy(hidden[:, :-1], head.weight, getattr(head, "bias", None), labels, chunk_tokens)

    head.forward = loss_forward
    try:
        yield
    finally:
        if patched_before is None:
            del head.forward
        else:
            head.forward = patched_before


def token_loss_sum(model, batch: dict, dev, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over the labelled tokens, their count as a tensor), for one micro-batch.
    `model` is the DeepSpeed engine (or any module returning `.logits`); `chunk_tokens` > 0 chunks the loss."""
    labels = batch["labels"][:, 1:].to(dev, non_blocking=True)
    inputs = model_inputs(batch, dev)
    count = (labels != IGNORE_INDEX).sum()
    if not chunk_tokens:
        logits = model(**inputs).logits
        return _sum_cross_entropy(logits[:, :-1], labels), count
    module = getattr(model, "module", model)
    with _head_computes_loss(module.get_output_embeddings(), labels, chunk_tokens):
        loss = model(**inputs).logits
    if loss.dim() != 0:  # a family whose forward reshapes the head's output cannot use the chunked loss
        name = type(module).__name__
        raise RuntimeError(f"{name} post-processes its LM head's output; use train.loss_chunk_tokens=0")
    return loss, count
