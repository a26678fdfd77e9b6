"""Per-rank memory of a DSEE training run, from shapes alone (no torch, no weights): the arithmetic behind
`dsee-dist plan`.

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

from dataclasses import dataclass, field

from dsee_dist.errors import ConfigError

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


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder: its sizes, read from a Hugging Face config.json."""

    family: str  # "gpt2" or "llama" (Llama, Mistral, Qwen2-style decoders)
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int
    head_dim: int
    intermediate: int
    vocab: int
    positions: int
    tied_embeddings: bool
    activation: str
    dropout: float = 0.0  # residual dropout in training (GPT-2's resid_pdrop); masks are saved when > 0
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def kv_width(self) -> int:
        return self.n_kv_head * self.head_dim


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def shape_from_hf_config(config: dict, dropout: float | None = None) -> ModelShape:
    """A ModelShape from a config.json dict. `dropout` overrides the config's (model.dropout)."""
    model_type = config.get("model_type", "")
    if model_type == "gpt2":
        hidden = config["n_embd"]
        resid = config.get("resid_pdrop", 0.1) if dropout is None else dropout
        return ModelShape(
            "gpt2",
            config["n_layer"],
            hidden,
            config["n_head"],
            config["n_head"],
            hidden // config["n_head"],
            config.get("n_inner") or 4 * hidden,
            config["vocab_size"],
            config.get("n_positions", 1024),
            config.get("tie_word_embeddings", True),
            config.get("activation_function", "gelu_new"),
            float(resid),
            True,
            True,
        )
    if model_type in LLAMA_LIKE:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return ModelShape(
            "llama",
            config["num_hidden_layers"],
            hidden,
            heads,
            config.get("num_key_value_heads") or heads,
            config.get("head_dim") or hidden // heads,
            config["intermediate_size"],
            config["vocab_size"],
            config.get("max_position_embeddings", 2048),
            config.get("tie_word_embeddings", False),
            config.get("hidden_act", "silu"),
            0.0,
            bool(config.get("attention_bias", model_type == "qwen2")),
            bool(config.get("mlp_bias", False)),
        )
    raise ConfigError(
        f"dsee-dist plan knows GPT-2 and Llama-style decoders ({', '.join(('gpt2',) + LLAMA_LIKE)}), "
        f"not model_type '{model_type}'; plan a model of one of those families"
    )


@dataclass(frozen=True)
class LinearModule:
    """One projection of the model: its name, shape, and which activation is its input (`input_name`: modules
    with the same input name read the same tensor, so an adapted module's saved input is shared)."""

    name: str
    in_features: int
    out_features: int
    input_name: str
    bias: bool
    layer: int  # -1 for the LM head


def linear_modules(shape: ModelShape) -> list[LinearModule]:
    """Every projection, named as in transformers (GPT-2: transformer.h.N.attn.c_attn, ...; Llama:
    model.layers.N.self_attn.q_proj, ...)."""
    h, ff, kv = shape.hidden, shape.intermediate, shape.kv_width
    q_width = shape.n_head * shape.head_dim
    mods: list[LinearModule] = []
    for i in range(shape.n_layer):
        if shape.family == "gpt2":
            p = f"transformer.h.{i}."
            mods += [
                LinearModule(p + "attn.c_attn", h, 3 * h, "attn_norm", True, i),
                LinearModule(p + "attn.c_proj", h, h, "attn_out", True, i),
                LinearModule(p + "mlp.c_fc", h, ff, "mlp_norm", True, i),
                LinearModule(p + "mlp.c_proj", ff, h, "mlp_act", True, i),
            ]
        else:
            p = f"model.layers.{i}."
            ab, mb = shape.attention_bias, shape.mlp_bias
            mods += [
                LinearModule(p + "self_attn.q_proj", h, q_width, "attn_norm", ab, i),
                LinearModule(p + "self_attn.k_proj", h, kv, "attn_norm", ab, i),
                LinearModule(p + "self_attn.v_proj", h, kv, "attn_norm", ab, i),
                LinearModule(p + "self_attn.o_proj", q_width, h, "attn_out", False, i),
                LinearModule(p + "mlp.gate_proj", h, ff, "mlp_norm", mb, i),
                LinearModule(p + "mlp.up_proj", h, ff, "mlp_norm", mb, i),
                LinearModule(p + "mlp.down_proj", ff, h, "mlp_act", mb, i),
            ]
    mods.append(LinearModule("lm_head", h, shape.vocab, "final_norm", False, -1))
    return mods


def parameter_count(shape: ModelShape) -> int:
    """All parameters of the model (tied embeddings counted once), as transformers builds it."""
    h = shape.hidden
    linears = [m for m in linear_modules(shape) if not (m.name == "lm_head" and shape.tied_embeddings)]
    total = sum(m.in_features * m.out_features + (m.out_features if m.bias else 0) for m in linears)
    total += shape.vocab * h
    if shape.family == "gpt2":
        total += shape.positions * h + (2 * shape.n_layer + 1) * 2 * h  # position table, LayerNorm weight + bias
    else:
        total += (2 * shape.n_layer + 1) * h  # RMSNorm weights
    return total


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


def _layer_saved_bytes(
    shape: ModelShape,
    adapted_in_layer: list[AdaptedModule],
    w: Workload,
    b: int,
    rank: int,
    num_sparse: int,
    first_layer: bool,
) -> int:
    """Bytes autograd saves for one block in forward (frozen base, DSEE on `adapted_in_layer`)."""
    tokens = w.micro_batch_size * w.seq_len
    h, ff, kv = shape.hidden, shape.intermediate, shape.kv_width
    q_width = shape.n_head * shape.head_dim
    per_token = 0  # bytes per token
    norm_bytes = FP32 if shape.family == "llama" else b  # Llama's RMSNorm saves an fp32 copy of its input
    stats = 2 * FP32 if shape.family == "gpt2" else FP32  # LayerNorm mean + rstd; RMSNorm's rsqrt
    # The block's first norm: its input needs no gradient in the first block (frozen embeddings).
    if not first_layer:
        per_token += h * norm_bytes + stats
    per_token += h * norm_bytes + stats  # the norm before the MLP
    # Attention (SDPA): q, k, v, output, log-sum-exp (fp32 per head).
    if shape.family == "gpt2":
        per_token += (3 * h + h) * b  # q, k, v are views of c_attn's output, which stays alive whole
    else:
        kv_saved = q_width if (w.padded and shape.n_kv_head != shape.n_head) else kv  # repeat_kv under a mask
        per_token += (q_width + 2 * kv_saved + q_width) * b
    per_token += shape.n_head * FP32
    # The MLP's activation.
    if shape.family == "gpt2":
        per_token += (4 if shape.activation == "gelu_new" else 1) * ff * b
        if shape.dropout > 0:  # residual dropout masks (bool) after attention and after the MLP
            per_token += 2 * h
    else:
        per_token += 3 * ff * b  # gate output (for SiLU), SiLU output and up output (for the product)
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
        _layer_saved_bytes(
            shape, [a for a in adapted if a.module.layer == i], w, b, rank, num_sparse, first_layer=i == 0
        )
        for i in range(shape.n_layer)
    ]
    final_norm = tokens * (shape.hidden * (FP32 if shape.family == "llama" else b) + FP32)
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
    b = engine.dtype_bytes
    n = engine.world_size
    stage = engine.zero_stage
    trainable_tensors = [t for a in adapted for t in a.tensors(rank, num_sparse)] + list(extra_trainable)
    trainable = sum(trainable_tensors)
    total = parameter_count(shape) if total_params is None else total_params
    trained_base = sum(t for a in adapted if a.kind == "full" for t in a.tensors(rank, num_sparse))
    frozen = total - trained_base - sum(extra_trainable)
    notes: list[str] = []

    rows: dict[str, int] = {}
    # Frozen base and trainable working copy.
    if stage == 3:
        rows["frozen parameters"] = 0 if engine.offload_param else -(-frozen // n) * b
        persistent = sum(t for t in trainable_tensors if t <= engine.persistence_threshold)
        rows["trainable parameters"] = (persistent + -(-(trainable - persistent) // n)) * b
        gathered = min(
            frozen + trainable - persistent,
            max(engine.max_live_parameters, max(m.in_features * m.out_features for m in linear_modules(shape))),
        )
        rows["gathered parameters (ZeRO-3)"] = gathered * b
        notes.append(
            f"ZeRO-3 keeps up to stage3_max_live_parameters={engine.max_live_parameters:.3g} gathered "
            f"values alive in forward/backward ({gathered * b / GIB:.2f} GiB here)"
        )
    else:
        rows["frozen parameters"] = frozen * b
        rows["trainable parameters"] = trainable * b
    partition = trainable if stage == 0 else -(-trainable // n)
    # Gradients and their buckets.
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
    rows["gradients"] = grads
    rows["gradient reduce buckets"] = buckets
    rows["optimizer: fp32 master + Adam moments"] = master + moments
    act_plain, act_ckpt = activation_bytes(shape, adapted, workload, b, rank, num_sparse)
    log_plain, log_chunked = logits_bytes(shape, workload, b)
    rows["activations" + (" (checkpointed)" if workload.activation_checkpointing else "")] = (
        act_ckpt if workload.activation_checkpointing else act_plain
    )
    rows["logits + loss" + (f" (chunks of {workload.loss_chunk_tokens})" if workload.loss_chunk_tokens else "")] = (
        log_chunked if workload.loss_chunk_tokens else log_plain
    )
    if engine.offload_param:
        host += -(-frozen // n) * b
    positions = workload.micro_batch_size * workload.seq_len
    suggested = min(SUGGESTED_LOSS_CHUNK, positions)
    logits = log_chunked if workload.loss_chunk_tokens else log_plain
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
