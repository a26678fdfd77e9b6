"""The prunable matrices of a decoder, named by kind, and where they live in the weight files.

Kinds (`families.KINDS`: the config's `prune.modules` choices): attn_q, attn_k, attn_v (separate projections,
or slices of a fused one: GPT-2's [q | k | v] thirds, GPT-NeoX's per-head interleaved rows), attn_out, mlp_in
(with the SwiGLU gate where the family has one), mlp_out. Embeddings, norms and the LM head are
never prunable. All matrices use the (out x in) convention; GPT-2's Conv1D stores (in x out) and is
transposed at the edges (`file_to_out_in` / `out_in_to_file`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsee_dist.dsee.layer import slice_rows
from dsee_dist.errors import ConfigError
from dsee_dist.models.families import KINDS, QKV, Family
from dsee_dist.models.shape import ModelShape, model_shape

__all__ = ["KINDS", "QKV", "PrunableMatrix", "module_name", "prunable_matrices", "file_to_out_in", "out_in_to_file"]


@dataclass(frozen=True)
class PrunableMatrix:
    name: str  # e.g. transformer.h.3.attn.c_attn.q, model.layers.3.self_attn.q_proj
    module: str  # e.g. transformer.h.3.attn.c_attn
    kind: str
    layer: int
    rows: tuple  # row set in the module's (out x in) weight: (start, size) or (start, size, block, stride)
    in_features: int
    conv1d: bool = False

    @property
    def numel(self) -> int:
        return self.rows[1] * self.in_features

    def row_index(self) -> torch.Tensor:
        return slice_rows(self.rows)

    def rows_of(self, weight_out_in: torch.Tensor) -> torch.Tensor:
        """This matrix's rows of its module's (out x in) weight (a copy for non-contiguous rows)."""
        if len(self.rows) == 2:
            return weight_out_in[self.rows[0] : self.rows[0] + self.rows[1]]
        return weight_out_in[self.row_index()]


def module_name(shape: ModelShape, layer: int, relative: str) -> str:
    return shape.module_name(layer, relative)


def prunable_matrices(config, kinds: list[str]) -> list[PrunableMatrix]:
    """Every matrix of the requested kinds, in model order (the global order ties are broken in). With
    a SwiGLU family, `mlp_in` also yields the gate projection (kind mlp_in, the same shape)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(
            f"prune.modules: '{unknown[0]}' is not a prunable module kind; choose from: " + ", ".join(KINDS)
        )
    shape = model_shape(config)
    family: Family = shape.family
    out = []
    for layer in range(shape.n_layer):
        geometry = shape.matrix_geometry(layer)
        for kind in KINDS:
            if kind not in kinds:
                continue
            rows, in_features = geometry[kind]
            relatives = [family.module_of_kind(kind)]
            if kind == "mlp_in" and family.mlp_gate:
                relatives = [family.mlp_gate, family.mlp_in]
            for relative in relatives:
                module = module_name(shape, layer, relative)
                name = module + ("." + kind[-1] if kind in QKV and family.is_fused() else "")
                out.append(PrunableMatrix(name, module, kind, layer, rows, in_features, family.conv1d))
    return out


def file_to_out_in(tensor: torch.Tensor, conv1d: bool = True) -> torch.Tensor:
    """A weight as stored -> (out x in): a transpose for GPT-2's Conv1D (in x out), as is for nn.Linear."""
    return tensor.t() if conv1d else tensor


def out_in_to_file(tensor: torch.Tensor, conv1d: bool = True) -> torch.Tensor:
    return tensor.t().contiguous() if conv1d else tensor.contiguous()
