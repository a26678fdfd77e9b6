"""Computing the sparse supports of all adapted matrices once per job, split across ranks.

Matrix i is decomposed by rank i % world_size. Under ZeRO-3 the matrices are gathered one at a
time (every rank takes part in each gather; only the owner keeps a copy), so no rank ever holds
more than one full matrix beyond its own partition. The (2 x N) index tensors are then shared
with every rank and written to `support.safetensors` in the output directory; a restarted or
resumed job reads them back and never recomputes a different support.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsee_dist.dsee.inject import TargetSpec
from dsee_dist.dsee.layer import slice_rows, weight_out_in
from dsee_dist.dsee.support import matrix_generator, select_support
from dsee_dist.engine import process_group, zero
from dsee_dist.errors import DSEEError
from dsee_dist.utils.files import atomic_path

logger = logging.getLogger(__name__)

SUPPORT_FILE = "support.safetensors"


def support_settings(dsee_cfg, seed: int, specs: list[TargetSpec]) -> dict:
    """What the support depends on; a stored support is reused only when these agree."""
    return {
        "method": dsee_cfg.support,
        "num_sparse": dsee_cfg.num_sparse,
        "seed": seed,
        "decomposition": vars(dsee_cfg.decomposition) if dsee_cfg.support == "decomposition" else None,
        "matrices": [m for spec in specs for m in spec.matrix_names()],
    }


def _read_support(path: Path, settings: dict) -> dict[str, torch.Tensor]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("dsee_support", "null"))
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DSEEError(
            f"support file '{path}' is unreadable ({type(exc).__name__}); delete it to recompute the support"
        ) from None
    if stored != settings:
        differing = sorted(k for k in settings if (stored or {}).get(k) != settings[k])
        raise DSEEError(
            f"support file '{path}' was computed with different settings ({', '.join(differing)}); "
            f"use a new output.dir or restore the original dsee settings"
        )
    return tensors


def _matrix_of(model, spec: TargetSpec, slice_idx: int) -> tuple[torch.nn.Parameter, torch.Tensor]:
    return model.get_submodule(spec.name).weight, slice_rows(spec.slices[slice_idx])


def compute_supports(
    model, specs: list[TargetSpec], dsee_cfg, seed: int, rank: int, world_size: int
) -> dict[str, torch.Tensor]:
    """Every rank calls this; returns the full {matrix name: (2 x N) slice-local index} on every rank."""
    jobs = [(spec, i, name) for spec in specs for i, name in enumerate(spec.matrix_names())]
    dc = dsee_cfg.decomposition
    mine: dict[str, torch.Tensor] = {}
    t0 = time.time()
    for round_start in range(0, len(jobs), world_size):
        my_matrix = None
        for owner, (spec, slice_idx, name) in enumerate(jobs[round_start : round_start + world_size]):
            weight, rows = _matrix_of(model, spec, slice_idx)
            with zero.gathered([weight]):
                if owner == rank:
                    module = model.get_submodule(spec.name)
                    my_matrix = (name, weight_out_in(module)[rows].detach().to("cpu", torch.float32, copy=True))
        if my_matrix is not None:
            name, matrix = my_matrix
            mine[name] = select_support(
                matrix,
                dsee_cfg.num_sparse,
                dsee_cfg.support,
                generator=matrix_generator(seed, name),
                rank_step=dc.rank_step,
                outer_iters=dc.outer_iters,
                inner_iters=dc.inner_iters,
                threshold=dc.threshold,
                algorithm=dc.algorithm,
            )
        done = min(round_start + world_size, len(jobs))
        logger.info(f"support ({dsee_cfg.support}): {done}/{len(jobs)} matrices, {time.time() - t0:.1f}s")
    supports: dict[str, torch.Tensor] = {}
    for part in process_group.all_gather_object(mine):
        supports.update(part)
    return supports


def load_or_compute_support(
    model, specs: list[TargetSpec], dsee_cfg, seed: int, out_dir: Path, dist_info
) -> dict[str, torch.Tensor]:
    path = Path(out_dir) / SUPPORT_FILE
    settings = support_settings(dsee_cfg, seed, specs)
    if dsee_cfg.num_sparse == 0:
        return {}
    if path.is_file():
        logger.info(f"support: reusing {path}")
        return _read_support(path, settings)
    supports = compute_supports(model, specs, dsee_cfg, seed, dist_info.rank, dist_info.world_size)
    if dist_info.is_rank_zero:
        with atomic_path(path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in supports.items()},
                str(tmp),
                metadata={"dsee_support": json.dumps(settings)},
            )
    process_group.barrier()
    return supports
