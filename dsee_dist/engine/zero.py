"""ZeRO-3 parameter helpers: whether a parameter is partitioned, full tensors for a block, creating
tensors partitioned. Everything here is a no-op below ZeRO stage 3."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params, modifier_rank: int | None = None):
    """Full tensors inside the block (ZeRO-3), else a no-op. With `modifier_rank`, that rank's edits
    are re-partitioned on exit."""
    params = [p for p in params if p is not None]
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def full_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """A full CPU copy of one parameter on every rank (gathers one tensor under ZeRO-3)."""
    with gathered([param]):
        return param.detach().to("cpu", copy=True)


def partitioned_init(ds_config: dict | None) -> Callable[[], contextlib.AbstractContextManager] | None:
    """Under ZeRO-3, a factory of fresh `deepspeed.zero.Init` contexts (modules created inside one are
    partitioned as they are created); None below stage 3."""
    if int((ds_config or {}).get("zero_optimization", {}).get("stage", 0)) != 3:
        return None
    import deepspeed

    return lambda: deepspeed.zero.Init(config_dict_or_path=ds_config)
