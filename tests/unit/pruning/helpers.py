"""A tiny GPT-2 on disk with a trained-looking DSEE adapter: what a finished stage 1 leaves behind."""

import copy
from pathlib import Path

import torch

from dsee_dist.config import DSEEConfig
from dsee_dist.dsee.adapter import save_adapter
from dsee_dist.dsee.inject import find_targets, inject_dsee
from dsee_dist.dsee.support import select_support
from dsee_dist.engine.process_group import DistInfo
from tests.conftest import tiny_gpt2

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0)


def stage1_outputs(tmp: Path, targets=("c_attn",), fused=("q", "v"), num_sparse=6, seed=0, n_head=4, n_embd=32):
    """(base model dir, adapter dir, the plain base model, the adapted model)."""
    base = tiny_gpt2(seed, n_embd=n_embd, n_head=n_head)
    base_dir = tmp / "base"
    base.save_pretrained(base_dir)
    model = copy.deepcopy(base)
    specs = find_targets(model, list(targets), list(fused))
    support = {}
    for spec in specs:
        for (start, size), name in zip(spec.slices, spec.matrix_names()):
            w = model.get_submodule(spec.name).weight.t()[start : start + size]
            support[name] = select_support(
                w.detach(), num_sparse, "magnitude", generator=torch.Generator().manual_seed(0)
            )
    inject_dsee(model, specs, support, rank=4, alpha=8, dropout=0.0, seed=seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_b", "sparse_values")):
                p.normal_(0, 0.2)
    cfg = DSEEConfig(
        lora_rank=4, lora_alpha=8, num_sparse=num_sparse, target_modules=list(targets), fused_slices=list(fused)
    )
    save_adapter(model, tmp / "adapter", base_model=str(base_dir), dsee_cfg=cfg, is_rank_zero=True)
    return base_dir, tmp / "adapter", base.eval(), model.eval()
