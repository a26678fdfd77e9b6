"""Calibration for activation-aware pruning (`prune.score: activation`, after Wanda): the L2 norm of every
input feature of every prunable module, over the tokens of a few training examples, run through the
stage-1 model (the base with its adapter), so the norms are those the tuned model sees.

Each rank runs its share of the examples (spread evenly over the training split, every world_size-th)
through its own copy of the stage-1 model; the per-feature sums of squares are all-reduced, so every rank
gets the same norms at any world size. Padding never counts (the attention mask selects the tokens).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dsee_dist.data import dataset as data
from dsee_dist.dsee.adapter import load_adapted_model
from dsee_dist.dsee.layer import base_shape
from dsee_dist.engine import distributed
from dsee_dist.models.loading import end_zero3_init

logger = logging.getLogger(__name__)


def calibration_indices(num_examples: int, split_size: int) -> list[int]:
    """`num_examples` training examples (at most the split) spread evenly over the split (data files often
    hold the references of one input next to each other; the first N would be a few inputs only)."""
    n = min(num_examples, split_size)
    return [i * split_size // n for i in range(n)]


def input_norms(
    adapter_dir: Path,
    base_model: str,
    modules: list[str],
    split: data.TokenizedSplit,
    pad_id: int,
    dist_info,
    *,
    num_examples: int,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Per module name, sqrt(sum over calibration tokens of x_j^2) for each input feature j (fp32, CPU).
    Collective: every rank calls it (a rank with no examples contributes zeros)."""
    device = torch.device(f"cuda:{dist_info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    end_zero3_init()  # a whole model in each rank, also after a ZeRO-3 stage 1 in this process
    model = load_adapted_model(adapter_dir, base_model, dtype=dtype).to(device)
    sums: dict[str, torch.Tensor] = {}
    mask_of_batch: list[torch.Tensor] = []

    def hook(name: str):
        def accumulate(_module, inputs):
            x = inputs[0].float()
            tokens = x[mask_of_batch[0]]  # (n_tokens, in): padding left out
            total = tokens.square().sum(dim=0)
            sums[name] = sums[name] + total if name in sums else total

        return accumulate

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in modules]
    chosen = calibration_indices(num_examples, len(split))
    mine = chosen[dist_info.rank :: dist_info.world_size]
    logger.info(f"calibration: input norms of {len(modules)} modules over {len(chosen)} training examples")
    try:
        with torch.no_grad():
            for start in range(0, len(mine), batch_size):
                batch = data.collate(split, mine[start : start + batch_size], pad_id)
                mask = batch["attention_mask"].to(device).bool()
                mask_of_batch[:] = [mask]
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long())
    finally:
        for handle in handles:
            handle.remove()
    # in_features of each module; a DSEE layer's is its wrapped base's
    widths = [base_shape(getattr(module, "base", module))[1] for module in map(model.get_submodule, modules)]
    del model
    flat = torch.cat([sums[name].cpu() if name in sums else torch.zeros(n) for name, n in zip(modules, widths)])
    flat = distributed.all_reduce_tensor(flat.double()).float().sqrt()
    return dict(zip(modules, (part.clone() for part in flat.split(widths))))
