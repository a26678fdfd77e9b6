"""The DSEE layer: a frozen projection plus a low-rank and a sparse trainable update.

For a frozen weight W0 (out x in) and each adapted row block ("slice") s of it:

    y = W0 x + b + (alpha / r) * B_s A_s drop(x) + (alpha / r) * S x

- A_s: r x in (Kaiming-uniform), B_s: d x r (zeros), so the update is exactly zero at step 0.
- S: out x in with N non-zeros per slice, stored as `sparse_values` (N per slice, zeros at start)
  plus a fixed `sparse_index` buffer (2 x N: row in W0's out dimension, column). Optimizer state
  is therefore O(N), not O(out * in).
- A slice is a set of output rows: the whole matrix for `nn.Linear`-style projections, the q / k / v
  thirds of GPT-2's fused `c_attn`, or the per-head interleaved q / k / v rows of GPT-NeoX's
  `query_key_value` (`slice_rows`), each adapted independently.

Both GPT-2's `Conv1D` (weight stored in x out) and `nn.Linear` (out x in) are wrapped; all
matrices here use the (out x in) convention, and `Conv1D` weights are transposed at the edges.
No ranks, no files: distributed concerns live elsewhere.

The sparse update S x has two implementations, chosen per device type by `SPARSE_UPDATE_PATH` (measured by
bench/dsee_layer.py; `set_sparse_update_path` changes it):
- "autograd": B A x through two linears, then S x as a gather of N input columns times the values, scatter-added
  into the N output rows, each op differentiated by autograd. Its backward fills an input-sized zero tensor for
  the gather's gradient and adds it to the low-rank branch's input gradient.
- "fused": `LowRankSparseDelta`, one autograd function doing the same forward ops (bitwise the same output) and
  one backward that scatter-adds the sparse part of the input gradient straight into the low-rank part's (an
  N-column buffer instead of an input-sized one), with every gradient computed by the same additions in the same
  order as autograd's (bitwise the same gradients). Used without
  dropout on the low-rank branch (with dropout the two branches read different inputs: "autograd").
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # GPT-2's transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None


# Per device type (x.device.type): "fused" or "autograd" (module docstring); other devices use "autograd".
# CPU: "autograd", as fast as "fused" within the noise on SmolLM2-135M's q_proj/v_proj (bench/dsee_layer.py
# --shapes smollm2, paired per-iteration ratio fused/autograd 1.00 and 1.03, docs/performance.md);
# CUDA: not measured yet.
SPARSE_UPDATE_PATH = {"cpu": "autograd", "cuda": "autograd"}
SPARSE_UPDATE_PATHS = ("autograd", "fused")


def set_sparse_update_path(device_type: str, path: str) -> None:
    """Choose how DSEE layers apply S x on `device_type` ("cpu", "cuda", ...): "fused" or "autograd"."""
    if path not in SPARSE_UPDATE_PATHS:
        raise ValueError(f"sparse update path {path!r}: choose one of {', '.join(SPARSE_UPDATE_PATHS)}")
    SPARSE_UPDATE_PATH[device_type] = path


class LowRankSparseDelta(torch.autograd.Function):
    """B A x + S x (unscaled) in one op, for x (..., in), A (r' x in), B (out x r'), S's N values at (rows, cols).

    Forward: the two low-rank matmuls, then the gather of x's N columns, times the values, scatter-added into the
    matmul's output (the same ops as the "autograd" path). Backward: grad_x = (g B) A with g's N gathered rows
    times the values scatter-added into it in place (summed per column first); grad_A = (g B)^T x,
    grad_B = g^T (A x), grad_values = the token sum of g's gathered rows times x's gathered columns."""

    @staticmethod
    def forward(ctx, x, lora_a, placed_b, values, rows, cols):
        low = F.linear(x, lora_a)  # (..., r')
        delta = F.linear(low, placed_b)  # (..., out)
        picked = x.index_select(-1, cols)  # (..., N)
        delta.index_add_(-1, rows, picked * values)
        ctx.save_for_backward(x, low, lora_a, placed_b, values, rows, cols, picked)
        return delta

    @staticmethod
    def backward(ctx, grad):
        x, low, lora_a, placed_b, values, rows, cols, picked = ctx.saved_tensors
        need_x, need_a, need_b, need_v = ctx.needs_input_grad[:4]
        grad_rows = grad.index_select(-1, rows)  # (..., N)
        grad_low = grad.matmul(placed_b) if need_x or need_a else None  # (..., r')
        grad_x = grad_a = grad_b = grad_v = None
        if need_x:
            # Entries sharing a column are summed first (as autograd's zero-filled buffer sums them), then added
            # to the low-rank part once per column: the same additions in the same order as the "autograd" path.
            unique_cols, inverse = torch.unique(cols, return_inverse=True)
            per_col = grad_rows.new_zeros(*grad_rows.shape[:-1], unique_cols.numel())
            per_col.index_add_(-1, inverse, grad_rows * values)
            grad_x = grad_low.matmul(lora_a)
            grad_x.index_add_(-1, unique_cols, per_col)
        if need_a:
            grad_a = grad_low.reshape(-1, grad_low.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
        if need_b:
            grad_b = grad.reshape(-1, grad.shape[-1]).t().mm(low.reshape(-1, low.shape[-1]))
        if need_v:
            grad_v = (grad_rows * picked).reshape(-1, values.numel()).sum(0)
        return grad_x, grad_a, grad_b, grad_v, None, None


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D, also when its weight is ZeRO-3 partitioned."""
    if is_conv1d(module):
        return module.nf, module.nx
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise TypeError(f"cannot adapt {type(module).__name__}: only nn.Linear and GPT-2 Conv1D are supported")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as an (out x in) view (a transpose for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def slice_rows(rows_spec, device=None) -> torch.Tensor:
    """The output rows of one slice: (start, size) = contiguous rows; (start, size, block, stride) = `size`
    rows taken `block` at a time every `stride` rows (GPT-NeoX's per-head interleaved q/k/v)."""
    start, size = rows_spec[0], rows_spec[1]
    local = torch.arange(size, device=device)
    if len(rows_spec) == 2:
        return local + start
    block, stride = rows_spec[2], rows_spec[3]
    return start + (local // block) * stride + local % block


def _slice_rows(slices, device) -> torch.Tensor:
    """The output rows of all slices, in slice order."""
    return torch.cat([slice_rows(s, device) for s in slices])


def row_slots(slices, out_features: int | None = None, device=None) -> torch.Tensor:
    """For every output row (up to the last adapted one by default): its position in the slices'
    concatenated rows, or -1 if it is not adapted."""
    rows = _slice_rows(slices, device)
    slots = torch.full((out_features or int(rows.max()) + 1,), -1, dtype=torch.long, device=device)
    slots[rows] = torch.arange(rows.numel(), device=device)
    return slots


def _sparse_in_slices(values, index, slices, like: torch.Tensor) -> torch.Tensor:
    """S laid out like the slices (n_slices x slice_size x in); zeros when there is no sparse part."""
    dense = torch.zeros_like(like)
    if values is None or index.shape[1] == 0:
        return dense
    rows, cols = index
    slots = row_slots(slices, None, rows.device)[rows]
    flat = dense.view(-1, dense.shape[-1]).index_put((slots, cols), values.to(dense.dtype), accumulate=True)
    return flat.view_as(dense)


def _slice_updates(lora_a, lora_b, sparse_values, sparse_index, slices) -> tuple[torch.Tensor, torch.Tensor]:
    """(B A, S), unscaled, each laid out like the slices (n_slices x slice_size x in)."""
    n_slices, _, rank = lora_b.shape
    low_rank = torch.bmm(lora_b, lora_a.reshape(n_slices, rank, -1))
    return low_rank, _sparse_in_slices(sparse_values, sparse_index, slices, low_rank)


def delta_from_factors(
    lora_a,
    lora_b,
    sparse_values,
    sparse_index,
    slices,
    out_features: int,
    scaling: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(alpha / r) (B A + S) [* M] as a dense (out x in) matrix, from the factors of one DSEE layer
    (also those read back from an adapter file). `mask`: n_slices x slice_size x in, 1 = kept."""
    low_rank, sparse = _slice_updates(lora_a, lora_b, sparse_values, sparse_index, slices)
    per_slice = low_rank + sparse
    if mask is not None:
        per_slice = per_slice * mask.to(per_slice.dtype)
    delta = per_slice.new_zeros(out_features, per_slice.shape[-1])
    delta[_slice_rows(slices, delta.device)] = per_slice.flatten(0, 1)
    return delta * scaling


class PruneMask(nn.Module):
    """A frozen 0/1 mask over the adapted rows of a DSEE layer. A module of its own so that, under ZeRO-3,
    it is partitioned with the base and gathered only while this layer runs."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(shape, dtype=dtype), requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.mask.to(t.dtype)


class DSEELayer(nn.Module):
    """Wraps a frozen `nn.Linear` or GPT-2 `Conv1D` with DSEE's low-rank + sparse update."""

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        slices: list[tuple[int, int]] | None = None,
        sparse_index: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        out_features, in_features = base_shape(base)
        slices = list(slices) if slices else [(0, out_features)]
        sizes = {s[1] for s in slices}
        if len(sizes) != 1:
            raise ValueError(f"all adapted slices must have the same size, got {slices}")
        slices = [tuple(int(v) for v in s) for s in slices]
        rows = _slice_rows(slices, None)
        if (
            int(rows.max()) >= out_features
            or rows.unique().numel() != rows.numel()
            or [s[0] for s in slices] != sorted(s[0] for s in slices)
        ):
            raise ValueError(f"slices {slices} must be ordered, disjoint and inside {out_features} output rows")
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.slices = slices
        self.slice_size = slices[0][1]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

        dtype = base.weight.dtype
        n_slices = len(slices)
        self.lora_a = nn.Parameter(torch.empty(n_slices * rank, in_features, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(n_slices, self.slice_size, rank, dtype=dtype))
        self.reset_lora_a(generator)
        if sparse_index is not None and sparse_index.numel() > 0:
            sparse_index = sparse_index.to(torch.long)
            if sparse_index.dim() != 2 or sparse_index.shape[0] != 2:
                raise ValueError("sparse_index must have shape (2, N): rows and columns")
            if (
                int(sparse_index[0].max()) >= out_features
                or int(sparse_index[1].max()) >= in_features
                or int(sparse_index.min()) < 0
            ):
                raise ValueError(f"sparse_index out of range for a {out_features} x {in_features} weight")
            self.register_buffer("sparse_index", sparse_index.clone(), persistent=True)
            self.sparse_values = nn.Parameter(torch.zeros(sparse_index.shape[1], dtype=dtype))
        else:
            self.register_buffer("sparse_index", torch.zeros(2, 0, dtype=torch.long), persistent=True)
            self.sparse_values = None
        # Whether the slices tile the whole output: then the low-rank update is added without padding.
        self._covers_output = n_slices == 1 and slices[0] == (0, out_features)
        # After unstructured pruning (stage 2): which entries of the adapted rows survive (frozen, 0/1).
        self.prune_mask: PruneMask | None = None

    def reset_lora_a(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform A per slice (as LoRA and PEFT), drawn from `generator` for reproducibility."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r x in) matrix
        with torch.no_grad():
            values = torch.rand(self.lora_a.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
            self.lora_a.copy_(values.to(self.lora_a.dtype))

    @property
    def num_sparse(self) -> int:
        return int(self.sparse_index.shape[1])

    def adapter_params(self) -> dict[str, nn.Parameter]:
        params = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        if self.sparse_values is not None:
            params["sparse_values"] = self.sparse_values
        return params

    # ------------------------------------------------------------------ forward

    def _placed_lora_b(self) -> torch.Tensor:
        """B of every slice placed at its rows of an (out x n_slices*r) matrix, zeros elsewhere: one
        small matrix, so the fused low-rank update is a single matmul with no padded activations."""
        if self._covers_output:
            return self.lora_b[0]
        placed = self.lora_b.new_zeros(self.out_features, len(self.slices) * self.rank)
        for i, rows_spec in enumerate(self.slices):
            if len(rows_spec) == 2:
                placed[rows_spec[0] : rows_spec[0] + rows_spec[1], i * self.rank : (i + 1) * self.rank] = self.lora_b[i]
            else:
                placed[slice_rows(rows_spec, placed.device), i * self.rank : (i + 1) * self.rank] = self.lora_b[i]
        return placed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        x = x.to(self.lora_a.dtype)
        if self.prune_mask is not None:
            return torch.add(result, self._masked_delta(x).to(result.dtype), alpha=self.scaling)
        if (
            self.sparse_values is not None
            and isinstance(self.lora_dropout, nn.Identity)
            and SPARSE_UPDATE_PATH.get(x.device.type) == "fused"
        ):
            rows, cols = self.sparse_index
            delta = LowRankSparseDelta.apply(x, self.lora_a, self._placed_lora_b(), self.sparse_values, rows, cols)
            return torch.add(result, delta.to(result.dtype), alpha=self.scaling)
        # B A drop(x) for every slice, over the full output dimension: (..., out)
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self._placed_lora_b())
        if self.sparse_values is not None:
            # S x from the N entries alone: gather x's columns, scatter-add into the rows (in place on
            # `delta`, a fresh matmul output that autograd does not need)
            rows, cols = self.sparse_index
            delta.index_add_(-1, rows, x.index_select(-1, cols) * self.sparse_values)
        return torch.add(result, delta.to(result.dtype), alpha=self.scaling)

    def _masked_delta(self, x: torch.Tensor) -> torch.Tensor:
        """After unstructured pruning: x ((B A + S) * M)^T on the adapted rows, so that pruned entries of the
        effective weight (W0 * M + ((B A + S) * M)) are exactly zero during training, as in the export.
        The update is materialised per slice (n_slices x size x in): a small cost next to the base matmul."""
        low_rank, sparse = _slice_updates(self.lora_a, self.lora_b, self.sparse_values, self.sparse_index, self.slices)
        if isinstance(self.lora_dropout, nn.Identity):
            rows_out = F.linear(x, self.prune_mask(low_rank + sparse).flatten(0, 1))
        else:
            rows_out = F.linear(self.lora_dropout(x), self.prune_mask(low_rank).flatten(0, 1)) + F.linear(
                x, self.prune_mask(sparse).flatten(0, 1)
            )
        if self._covers_output:
            return rows_out
        return rows_out.new_zeros(*rows_out.shape[:-1], self.out_features).index_copy(
            -1, _slice_rows(self.slices, rows_out.device), rows_out
        )

    def attach_prune_mask(self, keep: torch.Tensor, create_context=None, gathered=None) -> None:
        """Keep only the entries where `keep` (n_slices x slice_size x in, bool) is true in the update.

        `create_context` (e.g. deepspeed.zero.Init) partitions the mask as it is created; `gathered(params,
        modifier_rank)` gathers it for writing. Both default to no-ops (no ZeRO-3)."""
        shape = (len(self.slices), self.slice_size, self.in_features)
        if tuple(keep.shape) != shape:
            raise ValueError(f"prune mask of shape {tuple(keep.shape)} does not fit the adapted rows {shape}")
        with create_context or contextlib.nullcontext():
            self.prune_mask = PruneMask(shape, self.lora_a.dtype)
        with (gathered or (lambda params, modifier_rank: contextlib.nullcontext()))([self.prune_mask.mask], 0):
            with torch.no_grad():
                self.prune_mask.mask.copy_(keep.to(self.prune_mask.mask.dtype))

    # ------------------------------------------------------------------ merged weights

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) (B A + S), times the pruning mask if any, as a dense (out x in) matrix. Needs the
        adapter tensors (and the mask) gathered."""
        mask = self.prune_mask.mask if self.prune_mask is not None else None
        return delta_from_factors(
            self.lora_a,
            self.lora_b,
            self.sparse_values,
            self.sparse_index,
            self.slices,
            self.out_features,
            self.scaling,
            mask=mask,
        )

    def merge(self) -> None:
        """Add the update into the base weight (checked for non-finite values before committing)."""
        if self.merged:
            return
        with torch.no_grad():
            merged = weight_out_in(self.base).detach().clone() + self.delta_weight().to(self.base.weight.dtype)
            if not torch.isfinite(merged).all():
                raise ValueError("merging would write non-finite values into the base weight; the adapter is broken")
            weight_out_in(self.base).copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            weight_out_in(self.base).sub_(self.delta_weight().to(self.base.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}, "
            f"slices={self.slices}, num_sparse={self.num_sparse}"
        )
