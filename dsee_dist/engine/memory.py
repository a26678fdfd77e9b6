"""Per-rank memory of a DSEE training run, from shapes alone (no weights): the arithmetic behind `dsee-dist plan`.

The model's shape, its projections and parameter count are `dsee_dist.models.shape`'s; what is here is the memory
DeepSpeed's ZeRO stages hold for them (partitioning, reduce buckets, fp32 master copies, offload, read from the
DeepSpeed JSON with DeepSpeed's defaults), and what autograd and the loss keep alive.

Every figure is bytes on one rank at the step's peak, which is at the start of backward: all saved activations
plus the loss's transient buffers are alive on top of the model and optimizer state of the previous step.

- Parameters: the frozen base in the training dtype, partitioned (base / world size) under ZeRO-3, where the
  parameters gathered for forward/backward (up to `stage3_max_live_parameters`) come on top.
- Trainable parameters (A, B, the sparse values): the working copy in the training dtype; DeepSpeed's ZeRO
  optimizers keep an fp32 master copy of this rank's partition even in fp32 training.
- Gradients: ZeRO-0/1 hold a full gradient per trainable parameter; ZeRO-2/3 hold this rank's partition (and
  an fp32 copy of it at the step); ZeRO-1/2/3 allocate the reduce bucket (`reduce_bucket_size` elements, two
  with `overlap_comm`) whatever the model size.
- Optimizer: Adam's two fp32 moments of this rank's partition (all of it below ZeRO-1).
- Activations: what autograd saves in transformers' GPT-2 and Llama blocks with SDPA attention and a frozen
  base: a frozen linear saves nothing, an adapted one saves its input, norms save their input, attention saves
  q, k, v, the output and the log-sum-exp, the MLP saves its activation's inputs (GPT-2's `gelu_new` is four
  elementwise ops, four saved tensors). With activation checkpointing only each block's input is saved, and one
  block's activations are recomputed at a time in backward.
- Logits and loss: the plain loss holds about three fp32 copies of the logits at its peak (log-softmax output,
  its gradient and the input's gradient: 12 bytes per position per vocabulary entry); the chunked loss holds two
  fp32 logits-sized buffers for one chunk of positions (the logits, then the log-sum-exp's temporary or the
  gradient in the training dtype) and the gradient of the hidden states of every position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dsee_dist.errors import ConfigError
from dsee_dist.models import families
from dsee_dist.models.shape import LinearModule, ModelShape, linear_modules, model_shape, parameter_count

FP32 = 4
GIB = 1024**3
MIB = 1024**2
# DeepSpeed's defaults for the keys the plan reads (deepspeed/runtime/zero/config.py).
DS_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "overlap_comm_stage3": True,
    "overlap_comm": False,
    "contiguous_gradients": True,
    "stage3_max_live_parameters": 1e9,
    "stage3_param_persistence_threshold": 1e5,
}


# The decoders whose blocks the activation model below covers (transformers' GPT-2 and Llama-style blocks); a
# structurally pruned GPT-2's per-layer config is not planned.
PLANNED_FAMILIES = (families.GPT2, families.LLAMA, families.QWEN2)
PLANNED_TYPES = tuple(t for f in PLANNED_FAMILIES for t in f.model_types if t != "dsee_pruned_gpt2")


def shape_from_hf_config(config: dict, dropout: float | None = None) -> ModelShape:
    """The shape of a config.json dict for the plan (`models.shape.model_shape`); `dropout` overrides the
    config's residual dropout (model.dropout) where the family has one. A one-line ConfigError for a model
    whose blocks the plan does not model."""
    model_type = config.get("model_type", "")
    if model_type not in PLANNED_TYPES:
        raise ConfigError(
            f"dsee-dist plan knows GPT-2 and Llama-style decoders ({', '.join(PLANNED_TYPES)}), "
            f"not model_type '{model_type}'; plan a model of one of those families"
        )
    shape = model_shape(config, purpose="dsee-dist plan")
    if dropout is None or shape.family.dropout_key is None:
        return shape
    return dataclasses.replace(shape, dropout=float(dropout))


@dataclass(frozen=True)
class AdaptedModule:
    """A trained module. `kind`: "dsee" (`n_slices` blocks of `slice_rows` output rows, each with its own A, B and
    N sparse values), "lora" (PEFT LoRA on the whole module) or "full" (the weight itself is trained)."""

    module: LinearModule
    kind: str = "dsee"
    n_slices: int = 1
    slice_rows: int = 0

    @property
    def fused(self) -> bool:  # DSEE places B of several slices into one (out x n_slices*r) matrix per step
        return self.kind == "dsee" and (self.n_slices > 1 or self.slice_rows != self.module.out_features)

    def tensors(self, rank: int, num_sparse: int) -> list[int]:
        """Element counts of its trainable tensors (lora_a, lora_b[, sparse_values]; or weight[, bias])."""
        m = self.module
        if self.kind == "full":
            return [m.in_features * m.out_features] + ([m.out_features] if m.bias else [])
        if self.kind == "lora":
            return [rank * m.in_features, m.out_features * rank]
        sizes = [self.n_slices * rank * m.in_features, self.n_slices * self.slice_rows * rank]
        return sizes + ([self.n_slices * num_sparse] if num_sparse else [])

    def saved_per_token(self, rank: int, num_sparse: int) -> int:
        """Elements saved per token beyond the module's input: A x, and DSEE's gathered columns and products."""
        if self.kind == "full":
            return 0
        if self.kind == "lora":
            return rank
        return self.n_slices * rank + (2 * self.n_slices * num_sparse if num_sparse else 0)


@dataclass(frozen=True)
class EngineSettings:
    """The DeepSpeed settings that decide memory."""

    zero_stage: int
    world_size: int
    bf16: bool
    reduce_bucket_size: int
    overlap_comm: bool
    contiguous_gradients: bool
    max_live_parameters: int
    persistence_threshold: int
    offload_optimizer: bool
    offload_param: bool

    @property
    def dtype_bytes(self) -> int:
        return 2 if self.bf16 else FP32

    @classmethod
    def from_deepspeed_config(cls, ds: dict, world_size: int) -> EngineSettings:
        zero = ds.get("zero_optimization", {}) or {}
        stage = int(zero.get("stage", 0))
        if (ds.get("fp16", {}) or {}).get("enabled"):
            raise ConfigError("dsee-dist plan covers fp32 and bf16 runs; the DeepSpeed JSON enables fp16")
        return cls(
            zero_stage=stage,
            world_size=world_size,
            bf16=bool((ds.get("bf16", {}) or {}).get("enabled")),
            reduce_bucket_size=int(float(zero.get("reduce_bucket_size", DS_DEFAULTS["reduce_bucket_size"]))),
            overlap_comm=bool(
                zero.get(
                    "overlap_comm", DS_DEFAULTS["overlap_comm_stage3"] if stage == 3 else DS_DEFAULTS["overlap_comm"]
                )
            ),
            contiguous_gradients=bool(zero.get("contiguous_gradients", DS_DEFAULTS["contiguous_gradients"])),
            max_live_parameters=int(
                float(zero.get("stage3_max_live_parameters", DS_DEFAULTS["stage3_max_live_parameters"]))
            ),
            persistence_threshold=int(
                float(zero.get("stage3_param_persistence_threshold", DS_DEFAULTS["stage3_param_persistence_threshold"]))
            ),
            offload_optimizer=(zero.get("offload_optimizer", {}) or {}).get("device", "none") not in ("none", None),
            offload_param=(zero.get("offload_param", {}) or {}).get("device", "none") not in ("none", None),
        )


@dataclass(frozen=True)
class Workload:
    """One micro-batch: `micro_batch_size` sequences of `seq_len` tokens. `padded`: batches carry a padding
    mask (E2E, jsonl), so attention gets a 4-D mask and GQA keys/values are repeated to all heads."""

    micro_batch_size: int
    seq_len: int
    padded: bool = True
    activation_checkpointing: bool = False
    loss_chunk_tokens: int = 0  # 0 = the plain loss over the whole micro-batch


@dataclass
class MemoryPlan:
    """Per-rank bytes by component (`rows`, in display order), the peak, and what was assumed."""

    rows: dict[str, int]
    activations_plain: int
    activations_checkpointed: int
    logits_plain: int
    logits_chunked: int
    suggested_chunk: int  # positions per loss chunk the plan suggests (SUGGESTED_LOSS_CHUNK, at most a micro-batch)
    logits_suggested_chunk: int  # what the chunked loss would hold with it
    host_bytes: int
    trainable_params: int
    frozen_params: int
    notes: list[str] = field(default_factory=list)
    # Bytes of `rows` never alive together: the reduce buckets are allocated at the first gradient of backward,
    # after the loss's buffers are freed, so the peak counts the larger of the two.
    not_coexisting: int = 0

    @property
    def peak(self) -> int:
        return sum(self.rows.values()) - self.not_coexisting

    def fits(self, device_bytes: int) -> bool:
        return self.peak <= device_bytes


def _norm_saved_per_token(shape: ModelShape, b: int) -> int:
    """Bytes a norm saves per token: its input (Llama's RMSNorm an fp32 copy of it) and its statistics
    (LayerNorm's mean and rstd; RMSNorm's rsqrt)."""
    if shape.family.norm == "rmsnorm":
        return shape.hidden * FP32 + FP32
    return shape.hidden * b + 2 * FP32


def _layer_saved_bytes(
    shape: ModelShape,
    layer: int,
    adapted_in_layer: list[AdaptedModule],
    w: Workload,
    b: int,
    rank: int,
    num_sparse: int,
) -> int:
    """Bytes autograd saves for one block in forward (frozen base, DSEE on `adapted_in_layer`)."""
    tokens = w.micro_batch_size * w.seq_len
    h, ff, kv = shape.hidden, shape.inner[layer], shape.kv_width(layer)
    q_width = shape.q_width(layer)
    # The block's first norm (its input needs no gradient in the first block: frozen embeddings), the MLP's norm.
    per_token = _norm_saved_per_token(shape, b) * (1 if layer == 0 else 2)
    # Attention (SDPA): q, k, v, output, log-sum-exp (fp32 per head). A fused projection's q, k, v are views of its
    # output, which stays alive whole; repeat_kv under a mask saves keys and values for every query head.
    grouped = shape.kv_heads[layer] != shape.heads[layer]
    kv_saved = q_width if (w.padded and grouped) else kv
    per_token += (q_width + 2 * kv_saved + q_width) * b + shape.heads[layer] * FP32
    # The MLP's activation: a SwiGLU's gate output (for SiLU), SiLU output and up output (for the product);
    # GPT-2's gelu_new is four elementwise ops.
    if shape.family.mlp_gate:
        per_token += 3 * ff * b
    else:
        per_token += (4 if shape.activation == "gelu_new" else 1) * ff * b
    if shape.dropout > 0:  # residual dropout masks (bool) after attention and after the MLP
        per_token += 2 * h
    # Adapted modules: their input (once per distinct input), the rank-r projection and the sparse gather.
    widths = {"attn_norm": h, "attn_out": q_width, "mlp_norm": h, "mlp_act": ff}
    for name in {a.module.input_name for a in adapted_in_layer}:
        per_token += widths[name] * b
    fixed = 0
    for a in adapted_in_layer:
        per_token += a.saved_per_token(rank, num_sparse) * b
        if a.fused:
            fixed += a.module.out_features * a.n_slices * rank * b  # the placed B of the slices
    return tokens * per_token + fixed


def activation_bytes(
    shape: ModelShape, adapted: list[AdaptedModule], w: Workload, b: int, rank: int, num_sparse: int
) -> tuple[int, int]:
    """(saved activations without checkpointing, peak activations with checkpointing), bytes."""
    tokens = w.micro_batch_size * w.seq_len
    per_layer = [
        _layer_saved_bytes(shape, i, [a for a in adapted if a.module.layer == i], w, b, rank, num_sparse)
        for i in range(shape.n_layer)
    ]
    final_norm = tokens * (shape.hidden * (FP32 if shape.family.norm == "rmsnorm" else b) + FP32)
    mask = w.micro_batch_size * w.seq_len * w.seq_len if w.padded else 0  # the 4-D boolean attention mask
    plain = sum(per_layer) + final_norm + mask
    # Checkpointed: each block's input hidden state, plus one block recomputed during backward.
    checkpointed = shape.n_layer * tokens * shape.hidden * b + max(per_layer) + final_norm + mask
    return plain, checkpointed


SUGGESTED_LOSS_CHUNK = 4096  # positions per chunk the plan suggests for train.loss_chunk_tokens


def logits_bytes(shape: ModelShape, w: Workload, b: int) -> tuple[int, int]:
    """(plain loss peak, chunked loss peak). Plain: three fp32 logits-sized buffers over the positions at once (the
    log-softmax output, its gradient, the input gradient), plus the logits in the training dtype. Chunked
    (recipes/loss.py): two fp32 logits-sized buffers over one chunk, plus the hidden states' gradient."""
    positions = w.micro_batch_size * w.seq_len
    plain = positions * plain_loss_bytes_per_position(shape, b)
    if not w.loss_chunk_tokens:
        return plain, plain
    return plain, chunked_loss_bytes(shape, positions, min(positions, w.loss_chunk_tokens), b)


def chunked_loss_bytes(shape: ModelShape, positions: int, chunk: int, b: int) -> int:
    return chunk * chunked_loss_bytes_per_position(shape) + positions * shape.hidden * b


def plain_loss_bytes_per_position(shape: ModelShape, b: int) -> int:
    return shape.vocab * (3 * FP32 + (b if b != FP32 else 0))


def chunked_loss_bytes_per_position(shape: ModelShape) -> int:
    return shape.vocab * 2 * FP32


def _parameter_rows(
    shape: ModelShape, engine: EngineSettings, trainable_tensors: list[int], frozen: int
) -> tuple[dict[str, int], list[str]]:
    """The rows of the frozen base and the trainable working copy (and ZeRO-3's gathered parameters), with the
    note on the latter."""
    b, n, trainable = engine.dtype_bytes, engine.world_size, sum(trainable_tensors)
    if engine.zero_stage != 3:
        return {"frozen parameters": frozen * b, "trainable parameters": trainable * b}, []
    persistent = sum(t for t in trainable_tensors if t <= engine.persistence_threshold)
    largest = max(m.in_features * m.out_features for m in linear_modules(shape))
    gathered = min(frozen + trainable - persistent, max(engine.max_live_parameters, largest))
    rows = {
        "frozen parameters": 0 if engine.offload_param else -(-frozen // n) * b,
        "trainable parameters": (persistent + -(-(trainable - persistent) // n)) * b,
        "gathered parameters (ZeRO-3)": gathered * b,
    }
    note = (
        f"ZeRO-3 keeps up to stage3_max_live_parameters={engine.max_live_parameters:.3g} gathered "
        f"values alive in forward/backward ({gathered * b / GIB:.2f} GiB here)"
    )
    return rows, [note]


def _optimizer_rows(engine: EngineSettings, trainable: int) -> tuple[dict[str, int], int]:
    """The rows of the gradients, their reduce buckets and the optimizer state, and the bytes the optimizer
    offload moves to host memory."""
    b, stage = engine.dtype_bytes, engine.zero_stage
    partition = trainable if stage == 0 else -(-trainable // engine.world_size)
    if stage == 0:
        grads = trainable * b + (trainable * FP32 if engine.bf16 else 0)  # bf16: fp32 master gradients too
        buckets = 0
    elif stage == 1:
        grads = trainable * b + partition * FP32
        buckets = engine.reduce_bucket_size * FP32 if engine.contiguous_gradients else 0
    else:
        grads = partition * b + partition * FP32  # this rank's partition, and its fp32 copy for the step
        buckets = engine.reduce_bucket_size * b if (engine.contiguous_gradients or stage == 3) else 0
    buckets *= 2 if (engine.overlap_comm and stage >= 1) else 1
    master = partition * FP32 if (stage >= 1 or engine.bf16) else 0
    moments = 2 * partition * FP32
    host = 0
    if engine.offload_optimizer:
        host = master + moments + partition * FP32
        master = moments = 0
        grads -= partition * FP32
    rows = {
        "gradients": grads,
        "gradient reduce buckets": buckets,
        "optimizer: fp32 master + Adam moments": master + moments,
    }
    return rows, host


def compute_plan(
    shape: ModelShape,
    adapted: list[AdaptedModule],
    rank: int,
    num_sparse: int,
    engine: EngineSettings,
    workload: Workload,
    total_params: int | None = None,
    extra_trainable: list[int] = (),
) -> MemoryPlan:
    """The per-rank memory plan of one configuration. `total_params`: the model's parameter count (default:
    `parameter_count(shape)`); `extra_trainable`: trained tensors outside `adapted` (full fine-tuning's
    embeddings and norms)."""
    b, n = engine.dtype_bytes, engine.world_size
    trainable_tensors = [t for a in adapted for t in a.tensors(rank, num_sparse)] + list(extra_trainable)
    trainable = sum(trainable_tensors)
    total = parameter_count(shape) if total_params is None else total_params
    trained_base = sum(t for a in adapted if a.kind == "full" for t in a.tensors(rank, num_sparse))
    frozen = total - trained_base - sum(extra_trainable)
    rows, notes = _parameter_rows(shape, engine, trainable_tensors, frozen)
    optimizer_rows, host = _optimizer_rows(engine, trainable)
    rows.update(optimizer_rows)
    act_plain, act_ckpt = activation_bytes(shape, adapted, workload, b, rank, num_sparse)
    log_plain, log_chunked = logits_bytes(shape, workload, b)
    checkpointing, chunk = workload.activation_checkpointing, workload.loss_chunk_tokens
    rows["activations" + (" (checkpointed)" if checkpointing else "")] = act_ckpt if checkpointing else act_plain
    logits = log_chunked if chunk else log_plain
    rows["logits + loss" + (f" (chunks of {chunk})" if chunk else "")] = logits
    if engine.offload_param:
        host += -(-frozen // n) * b
    positions = workload.micro_batch_size * workload.seq_len
    suggested = min(SUGGESTED_LOSS_CHUNK, positions)
    buckets = rows["gradient reduce buckets"]
    if buckets:
        notes.append(
            f"the reduce bucket ({buckets / MIB:.0f} MiB) and the loss's buffers are not alive together; "
            f"DeepSpeed may briefly hold a second bucket (+{buckets / MIB:.0f} MiB) when it starts a backward"
        )
    return MemoryPlan(
        rows,
        act_plain,
        act_ckpt,
        log_plain,
        log_chunked,
        suggested,
        chunked_loss_bytes(shape, positions, suggested, b),
        host,
        trainable,
        frozen,
        notes,
        not_coexisting=min(buckets, logits),
    )
