"""Calibration for activation-aware pruning (`prune.score: activation`, after Wanda): the L2 norm of every
input feature of every prunable module, over the tokens of a few training examples, run through the
stage-1 model (the base with its adapter), so the norms are those the tuned model sees.

The model is the one training builds (recipes/two_stage.py sets it up like a training stage, with the
stage-1 adapter): under ZeRO-3 it stays partitioned and DeepSpeed gathers one layer at a time inside each
forward, so no rank ever holds the whole base; every rank then runs the same number of forwards (a rank
with fewer micro-batches repeats one and drops its sums: `engine.rank_share`). Below ZeRO-3 every rank
holds the model anyway.

The examples are spread evenly over the training split; each rank runs every world_size-th micro-batch;
the per-feature sums of squares are all-reduced, so every rank gets the same norms at any world size.
Padding never counts (the attention mask selects the tokens).
"""

from __future__ import annotations

import logging

import torch

from dsee_dist.data import dataset as data
from dsee_dist.dsee.layer import base_shape
from dsee_dist.engine import process_group
from dsee_dist.engine.zero import is_partitioned

logger = logging.getLogger(__name__)


def calibration_indices(num_examples: int, split_size: int) -> list[int]:
    """`num_examples` training examples (at most the split) spread evenly over the split (data files often
    hold the references of one input next to each other; the first N would be a few inputs only)."""
    n = min(num_examples, split_size)
    return [i * split_size // n for i in range(n)]


def held_fraction(model: torch.nn.Module) -> float:
    """The share of the model's parameter elements this rank holds between forwards (1.0 for a whole
    model; near 1 / world_size under ZeRO-3, where each rank keeps its partition and the small persistent
    parameters)."""
    held = total = 0
    for p in model.parameters():
        if is_partitioned(p):  # a released parameter keeps its partition; a persistent one stays whole
            held += p.data.numel() or p.ds_tensor.numel()
            total += p.ds_numel
        else:
            held, total = held + p.numel(), total + p.numel()
    return held / max(total, 1)


def input_norms(
    model: torch.nn.Module,
    modules: list[str],
    split: data.TokenizedSplit,
    pad_id: int,
    dist_info,
    *,
    num_examples: int,
    batch_size: int,
    device: torch.device,
    lockstep: bool = False,
) -> dict[str, torch.Tensor]:
    """Per module name, sqrt(sum over calibration tokens of x_j^2) for each input feature j (fp32, CPU).
    `model`: the stage-1 model, whole or (with `lockstep`, ZeRO-3) the engine's partitioned module.
    Collective: every rank calls it (a rank with no examples contributes zeros)."""
    sums: dict[str, torch.Tensor] = {}
    counting = [True]  # False during a lockstep round that only keeps pace with the other ranks
    mask_of_batch: list[torch.Tensor] = []

    def hook(name: str):
        def accumulate(_module, inputs):
            if not counting[0]:
                return
            tokens = inputs[0].float()[mask_of_batch[0]]  # (n_tokens, in): padding left out
            total = tokens.square().sum(dim=0)
            sums[name] = sums[name] + total if name in sums else total

        return accumulate

    chosen = calibration_indices(num_examples, len(split))
    batches = [chosen[start : start + batch_size] for start in range(0, len(chosen), batch_size)]
    share = process_group.rank_share(batches, dist_info.rank, dist_info.world_size, lockstep=lockstep)
    logger.info(
        f"calibration: input norms of {len(modules)} modules over {len(chosen)} training examples "
        f"({100 * held_fraction(model):.0f}% of the model's parameters held on rank {dist_info.rank})"
    )
    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for indices, counts in share:
                counting[0] = counts
                batch = data.collate(split, indices, pad_id)
                mask = batch["attention_mask"].to(device).bool()
                mask_of_batch[:] = [mask]
                model(**data.model_inputs(batch, device))  # packed rows: each example attends to itself only
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    # in_features of each module; a DSEE layer's is its wrapped base's
    widths = [base_shape(getattr(module, "base", module))[1] for module in map(model.get_submodule, modules)]
    flat = torch.cat([sums[name].cpu() if name in sums else torch.zeros(n) for name, n in zip(modules, widths)])
    flat = process_group.all_reduce_tensor(flat.double()).float().sqrt()
    return dict(zip(modules, (part.clone() for part in flat.split(widths))))
