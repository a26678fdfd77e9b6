"""The experiment config schema: one dataclass per YAML section, one field per key.

To add a key: add a field with its type (a `Literal[...]` for a fixed set of choices) and a default, and a
one-line help in `metadata={"help": ...}`. Loading (`loading.py`) type-checks it and refuses unknown keys;
a `Literal` field is checked against its choices by `validation.py` without further code. Range checks
that need more than the type go into `validation.py`. No torch, no deepspeed here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

TrainingMethod = Literal["dsee", "lora", "supra", "shira", "full"]
SupportMethod = Literal["decomposition", "magnitude", "random"]
DecompositionAlgorithm = Literal["fast", "reference"]
DataFormat = Literal["synthetic_e2e", "e2e", "text", "jsonl", "chat", "instruction"]
TrainOn = Literal["all_assistant", "last_assistant", "all"]
LRSchedule = Literal["constant", "linear", "cosine"]
FusedSlice = Literal["q", "k", "v"]
PruneMethod = Literal["none", "unstructured", "structured"]
PruneScore = Literal["delta", "merged", "base", "activation", "random"]
PruneHeadScore = Literal["delta", "delta+base", "activation"]
PruneGrouping = Literal["adaptation", "kind", "global", "row"]
PruneModuleKind = Literal["attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_out"]
HeadRounding = Literal["nearest", "down", "up"]
KeepBestMetric = Literal["bleu", "rouge_l"]

# The choice lists, for code that needs them as tuples (derived from the types above, never repeated).
SUPPORT_METHODS = typing.get_args(SupportMethod)
DATA_FORMATS = typing.get_args(DataFormat)
TRAIN_ON = typing.get_args(TrainOn)
LR_SCHEDULES = typing.get_args(LRSchedule)
FUSED_SLICE_NAMES = typing.get_args(FusedSlice)
PRUNE_METHODS = typing.get_args(PruneMethod)
PRUNE_SCORES = typing.get_args(PruneScore)
PRUNE_HEAD_SCORES = typing.get_args(PruneHeadScore)
PRUNE_GROUPINGS = typing.get_args(PruneGrouping)
PRUNE_MODULE_KINDS = typing.get_args(PruneModuleKind)
HEAD_ROUNDINGS = typing.get_args(HeadRounding)

# model.builtin: name -> GPT-2 shape. Built-in models are randomly initialised from train.seed (no download;
# models/loading.py builds them).
BUILTIN_MODELS: dict[str, dict] = {
    "gpt2-tiny": dict(n_layer=2, n_embd=64, n_head=4, n_positions=256),
    "gpt2-mini": dict(n_layer=4, n_embd=128, n_head=4, n_positions=512),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, n_positions=1024),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, n_positions=1024),
}

# The columns each data format reads, by the format's own names (`data.fields` maps them to a dataset's names),
# and the chat roles (`data.roles` maps other names to them). Data the config is checked against; the data
# package reads them from here (data/columns.py).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "e2e": ("mr", "ref"),
    "synthetic_e2e": ("mr", "ref"),
    "jsonl": ("prompt", "completion"),
    "chat": ("messages",),
    "instruction": ("instruction", "input", "output"),
    "text": (),
}
CHAT_ROLES = ("system", "user", "assistant")


def global_batch_size(micro_batch_size: int, grad_accum_steps: int, world_size: int) -> int:
    """Examples per optimizer step over all ranks: micro_batch_size x grad_accum_steps x world_size."""
    return micro_batch_size * grad_accum_steps * world_size


@dataclass
class ModelConfig:
    """Which pretrained decoder to adapt."""

    path: str | None = field(
        default=None,
        metadata={
            "help": "a local Hugging Face model directory (or, with hub access, a hub name); exclusive with builtin"
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "a GGUF checkpoint inside model.path (or an absolute path), dequantised once into "
            "output.dir/base_model (safetensors, training dtype at load); "
            "`dsee-dist models fetch smollm2 DIR` writes SmolLM2 ready-made"
        },
    )
    builtin: str | None = field(
        default=None,
        metadata={
            "help": "a small built-in GPT-2 (config.schema.BUILTIN_MODELS: gpt2-tiny to gpt2-xl), randomly initialised "
            "from train.seed, with a tokenizer trained locally on the training data"
        },
    )
    tokenizer_vocab_size: int = field(
        default=512, metadata={"help": "vocabulary size of the locally trained tokenizer (built-in models only)"}
    )
    dropout: float | None = field(
        default=None,
        metadata={
            "help": "overrides the model's own dropout probabilities (resid/embd/attn); null keeps the model's values"
        },
    )


@dataclass
class DataConfig:
    """Training and evaluation data."""

    format: DataFormat = field(
        default="synthetic_e2e",
        metadata={
            "help": "synthetic_e2e: a generated E2E-style task (no download); e2e: columns mr,ref (loss only on the "
            "reference); text: plain text packed into blocks; jsonl: columns prompt,completion (loss only on the "
            "completion); chat: a `messages` list of {role, content} (or ShareGPT {from, value}) per row, rendered "
            "with the tokenizer's chat template, loss on assistant turns; instruction: alpaca instruction,input,output "
            "(loss on the output). Every format but text reads JSONL/JSON/Parquet/CSV/Arrow files or directories, "
            "save_to_disk directories and hub dataset names (docs/DATA.md)"
        },
    )
    train_path: str | None = field(
        default=None,
        metadata={
            "help": "training data: a file, a directory of files, a save_to_disk directory or a hub dataset name"
        },
    )
    eval_path: str | None = field(
        default=None,
        metadata={"help": "evaluation data, as train_path (optional: without it 5 % of the training data is held out)"},
    )
    train_split: str = field(
        default="train", metadata={"help": "split read from a hub dataset or a save_to_disk DatasetDict (train_path)"}
    )
    eval_split: str = field(
        default="validation", metadata={"help": "split read from a hub dataset or DatasetDict given as eval_path"}
    )
    fields: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "column names, when the data's differ from the format's: {format's name: your column}, e.g. "
            "{messages: conversations} or {instruction: question, output: answer}"
        },
    )
    roles: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "chat: extra role names mapped to system/user/assistant (human, gpt, bot, model and ShareGPT's "
            "names are known already), e.g. {customer: user, agent: assistant}"
        },
    )
    train_on: TrainOn = field(
        default="all_assistant",
        metadata={
            "help": "chat/instruction: which tokens carry the loss: all_assistant (every assistant turn), "
            "last_assistant (the final one), all (every token of the rendered conversation)"
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "chat/instruction: a system message put first in every conversation that has none"},
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "pack training examples into rows of block_size (position ids restart per example, no attention "
            "across examples, labels never cross them; the loss equals the unpacked one): less padding, fewer steps "
            "per epoch. Evaluation data stays unpacked"
        },
    )
    num_proc: int = field(
        default=1, metadata={"help": "processes that tokenise (datasets' Dataset.map num_proc), on one rank per node"}
    )
    block_size: int = field(
        default=128,
        metadata={"help": "maximum sequence length (examples are truncated to it; text is packed into blocks of it)"},
    )
    max_train_examples: int = field(default=0, metadata={"help": "use at most this many training examples (0 = all)"})
    max_eval_examples: int = field(default=0, metadata={"help": "use at most this many evaluation examples (0 = all)"})
    synthetic_train_examples: int = field(
        default=2000, metadata={"help": "generated training examples (synthetic_e2e)"}
    )
    synthetic_eval_examples: int = field(
        default=200, metadata={"help": "generated evaluation examples (synthetic_e2e)"}
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "batch training examples of similar length together (random batch order, same on every rank and "
            "after resume), so variable-length data (E2E) is padded less; metrics.jsonl reports padding_fraction"
        },
    )


@dataclass
class DecompositionConfig:
    """Parameters of the sparse + low-rank decomposition that picks the sparse support."""

    algorithm: DecompositionAlgorithm = field(
        default="fast",
        metadata={
            "help": "fast: the greedy bilateral algorithm with larger rank steps and a thin QR (dsee/support.py); "
            "reference: the reference schedule step for step"
        },
    )
    rank_step: int = field(default=5, metadata={"help": "rank added per outer iteration"})
    outer_iters: int = field(default=100, metadata={"help": "outer iterations (rank increases)"})
    inner_iters: int = field(default=2, metadata={"help": "updates of the sparse part per outer iteration"})
    threshold: float = field(
        default=0.01, metadata={"help": "entries of the sparse part below this magnitude are zeroed"}
    )


@dataclass
class DSEEConfig:
    """The adapted layers: y = W0 x + b + (alpha/r) B A drop(x) + (alpha/r) S x."""

    lora_rank: int = field(default=16, metadata={"help": "r: rank of the low-rank update B A"})
    lora_alpha: float = field(default=32.0, metadata={"help": "alpha: the update is scaled by alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the input of the low-rank branch"})
    num_sparse: int = field(
        default=16,
        metadata={
            "help": "N: trainable sparse entries per adapted matrix (per q/k/v slice of a fused projection); 0 = LoRA"
        },
    )
    support: SupportMethod = field(
        default="decomposition", metadata={"help": "how the N positions are chosen from the pretrained weight"}
    )
    decomposition: DecompositionConfig = field(
        default_factory=DecompositionConfig, metadata={"help": "the decomposition behind support=decomposition"}
    )
    target_modules: list[str] = field(
        default_factory=lambda: ["auto"],
        metadata={
            "help": "module names to adapt; auto = the model family's query and value projections (GPT-2 c_attn q/v, "
            "Llama/Mistral/Qwen2/OPT q_proj+v_proj, GPT-NeoX query_key_value q/v); an entry matches a module "
            "whose full name equals it or ends with '.' + entry; 're:...' is a regular expression (full match)"
        },
    )
    fused_slices: list[FusedSlice] = field(
        default_factory=lambda: ["q", "v"],
        metadata={
            "help": "for fused q/k/v projections (GPT-2 c_attn, GPT-NeoX query_key_value): the slices adapted, "
            "each as its own matrix; empty = the fused matrix as one"
        },
    )
    exclude_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "module names never adapted, even if a target matches (same matching rules)"},
    )


@dataclass
class TrainConfig:
    """Optimisation. Exactly one of max_steps / epochs is non-zero."""

    seed: int = field(default=42, metadata={"help": "seed of the model init, the support, the data order"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas"})
    schedule: LRSchedule = field(default="linear", metadata={"help": "learning-rate decay after the warmup"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (exclusive with epochs)"})
    epochs: float = field(default=0.0, metadata={"help": "passes over the training set (exclusive with max_steps)"})
    micro_batch_size: int = field(default=4, metadata={"help": "examples per rank per forward pass"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0 disables it)"})
    log_every_n_steps: int = field(default=1, metadata={"help": "log loss, lr and grad norm every N steps"})
    stop_after_steps: int = field(
        default=0,
        metadata={
            "help": "stop with a checkpoint after this many steps of this job (0 = run to the end); for time-boxed "
            "allocations: the next job continues with resume=auto"
        },
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute each decoder block in backward instead of keeping its activations (transformers' "
            "gradient checkpointing, non-reentrant); same losses, less memory, about a third more compute"
        },
    )
    loss_chunk_tokens: int = field(
        default=0,
        metadata={
            "help": "apply the LM head and cross-entropy to this many labelled positions at a time, their gradients "
            "computed chunk by chunk in forward, so fp32 logits of the whole micro-batch never exist; any ZeRO stage "
            "(0 = all positions at once)"
        },
    )

    def global_batch_size(self, world_size: int) -> int:
        return global_batch_size(self.micro_batch_size, self.grad_accum_steps, world_size)


@dataclass
class EvalConfig:
    """Evaluation (perplexity on the evaluation set; BLEU and ROUGE-L of greedy generations, E2E data)."""

    every_n_steps: int = field(default=0, metadata={"help": "evaluate every K optimizer steps (0 = only at the end)"})
    micro_batch_size: int = field(default=8, metadata={"help": "examples per rank per evaluation batch"})
    max_batches: int = field(default=0, metadata={"help": "at most this many batches per rank (0 = the whole set)"})
    generate_every_n_steps: int = field(
        default=0,
        metadata={
            "help": "greedy-decode the first eval.generate_max_examples MRs of the evaluation set every K steps and "
            "log BLEU and ROUGE-L (0 = never; e2e and synthetic_e2e data)"
        },
    )
    generate_max_examples: int = field(
        default=100,
        metadata={"help": "MRs decoded by eval.generate_every_n_steps (the first ones, in order of first appearance)"},
    )
    final_generate: bool = field(
        default=False,
        metadata={
            "help": "at the end, decode every MR of the evaluation set with the generate: settings and write "
            "generations.txt and generations.scores.json (all five E2E figures) to output.dir"
        },
    )


@dataclass
class GenerateConfig:
    """Decoding (dsee-dist generate, eval.final_generate). The defaults are the LoRA paper's E2E decoding."""

    num_beams: int = field(default=10, metadata={"help": "beam width (1 = greedy)"})
    length_penalty: float = field(default=0.9, metadata={"help": "beam search: exponent of the length normalisation"})
    no_repeat_ngram_size: int = field(default=4, metadata={"help": "never repeat an n-gram of this size (0 = off)"})
    max_new_tokens: int = field(default=64, metadata={"help": "at most this many generated tokens per input"})
    batch_size: int = field(default=16, metadata={"help": "inputs per generate call, per rank"})
    stop_at_newline: bool = field(
        default=True, metadata={"help": "end an output at its first newline as well as at EOS"}
    )


@dataclass
class CheckpointConfig:
    """Sharded DeepSpeed checkpoints in output.dir/checkpoints."""

    every: int = field(
        default=0, metadata={"help": "save every N optimizer steps (0 = only at the end and on preemption)"}
    )
    keep_last: int = field(default=2, metadata={"help": "keep the newest K complete checkpoints (0 = keep all)"})
    keep_best: KeepBestMetric | None = field(
        default=None,
        metadata={
            "help": "also keep the checkpoint of the step with the best value of this generation metric (saved when "
            "eval.generate_every_n_steps finds a new best; never removed by keep_last); null = none"
        },
    )


@dataclass
class PruneConfig:
    """The two-stage recipe: stage 1 tunes A, B, S for `train.*` steps; the final weights are pruned; stage 2
    re-tunes A, B, S on the pruned base for `retrain_*` steps. `none` = one stage."""

    method: PruneMethod = field(default="none", metadata={"help": "none = one stage; else the pruning between"})
    score: PruneScore = field(
        default="delta",
        metadata={
            "help": "unstructured score: delta = |dW| for adapted matrices, |W0| for the others; merged = |W0 + dW|; "
            "base = |W0|; activation = |W0 + dW| x the L2 norm of each input feature over calibration_examples "
            "training examples (Wanda); random"
        },
    )
    ratio: float = field(
        default=0.2,
        metadata={"help": "unstructured: share of the entries of each group removed, ranked globally within the group"},
    )
    grouping: PruneGrouping = field(
        default="adaptation",
        metadata={
            "help": "adaptation: groups 'adapted' and 'frozen'; kind: one group per module kind; global: one group; "
            "row: every output row of every matrix loses its ratio (its adaptation group's ratio in group_ratios)"
        },
    )
    group_ratios: dict = field(
        default_factory=dict, metadata={"help": "per-group ratios overriding ratio, e.g. {adapted: 0.3, frozen: 0.2}"}
    )
    pattern: str | None = field(
        default=None,
        metadata={
            "help": "unstructured N:M sparsity, e.g. '2:4' (quote it in YAML 1.1 tools; this loader reads 2:4 as a "
            "string): every group of M consecutive input weights of every row of every pruned matrix keeps exactly "
            "the N highest-scoring (score); replaces ratio, grouping and group_ratios; a matrix whose input width M "
            "does not divide is left dense and named in the log; null = ratio-based pruning"
        },
    )
    calibration_examples: int = field(
        default=128,
        metadata={
            "help": "score or head_score activation: training examples whose inputs give the norms (split over ranks)"
        },
    )
    modules: list[PruneModuleKind] = field(
        default_factory=lambda: list(PRUNE_MODULE_KINDS),
        metadata={"help": "prunable module kinds (embeddings and the LM head never are)"},
    )
    heads_removed: int = field(default=0, metadata={"help": "structured: attention heads removed per layer"})
    head_ratio: float = field(
        default=0.0,
        metadata={
            "help": "structured: share of heads removed per layer (head_ratio * heads, rounded by head_rounding; "
            "under grouped-query attention head_ratio * query heads per KV group, rounded, from every group)"
        },
    )
    head_rounding: HeadRounding = field(
        default="nearest",
        metadata={
            "help": "how head_ratio's head count becomes whole heads: nearest (Python's round, halves to even: "
            "0.5 -> 0, 1.5 -> 2; the behaviour before this key existed), down, up; the log line gives requested "
            "and removed"
        },
    )
    mlp_ratio: float = field(default=0.0, metadata={"help": "structured: share of MLP neurons removed per layer"})
    head_score: PruneHeadScore = field(
        default="delta",
        metadata={
            "help": "structured score: delta = sum of |dW| over a head's q and v rows (a neuron's c_fc row and c_proj "
            "column), |W0| where not adapted; delta+base adds |W0|; activation = sum over a head's attention-output "
            "columns (a neuron's MLP-output column) of |W0 + dW| x that column's input norm over calibration_examples "
            "training examples (Wanda, structured)"
        },
    )
    tune_first: bool = field(
        default=True,
        metadata={
            "help": "true: DSEE's recipe (stage 1 tunes, the tuned weights are pruned, stage 2 re-tunes); false: no "
            "stage 1: the pretrained weights are pruned (score base, merged or activation) and stage 2 tunes a fresh "
            "adapter on the pruned base (prune, then recover; with dsee.num_sparse 0 that is LoRA recovery); "
            "train.* then sets only stage 2's optimiser (not its length: retrain_*)"
        },
    )
    retrain_steps: int = field(default=0, metadata={"help": "stage-2 optimizer steps (exclusive with retrain_epochs)"})
    retrain_epochs: float = field(default=0.0, metadata={"help": "stage-2 epochs (exclusive with retrain_steps)"})
    retrain_lr: float | None = field(default=None, metadata={"help": "stage-2 learning rate; null = train.lr"})
    flops_context: int = field(default=128, metadata={"help": "context length the FLOPs report assumes"})
    uniform_per_layer: bool = field(
        default=True,
        metadata={
            "help": "structured: remove the same number of heads and neurons from every layer, so Llama-family "
            "exports are stock configs; false ranks over all layers at once (GPT-2 only)"
        },
    )

    @property
    def nm_pattern(self) -> tuple[int, int] | None:
        """(N, M) of `pattern`, or None when unset or malformed (validation names a malformed one)."""
        if self.pattern is None:
            return None
        n, sep, m = str(self.pattern).strip().partition(":")
        if not (sep and n.strip().isdigit() and m.strip().isdigit()):
            return None
        n_keep, m_group = int(n), int(m)
        return (n_keep, m_group) if 1 <= n_keep < m_group else None

    @property
    def calibrates(self) -> bool:
        """Whether the chosen score needs calibration norms from the stage-1 model (`pruning.calibration`)."""
        return (self.method == "unstructured" and self.score == "activation") or (
            self.method == "structured" and self.head_score == "activation"
        )


@dataclass
class OutputConfig:
    """Where a run writes."""

    dir: str = field(default="runs/dsee", metadata={"help": "checkpoints, metrics, the adapter"})


@dataclass
class DeepSpeedSection:
    """The DeepSpeed engine settings."""

    config: str = field(
        default="configs/ds/zero3_fp32.json",
        metadata={
            "help": "DeepSpeed JSON with engine settings only; relative paths are tried against the working "
            "directory, then the experiment YAML's directory, then the repository"
        },
    )
    overrides: dict = field(
        default_factory=dict,
        metadata={"help": "nested values merged over the JSON (ds.zero_optimization.stage=2 on the command line)"},
    )
    timeout_s: int = field(
        default=1800,
        metadata={
            "help": "a collective waiting this long for another rank fails the job with a clear error instead of "
            "hanging; keep it above the longest checkpoint save or support computation"
        },
    )


@dataclass
class Config:
    """A whole experiment: one field per YAML section."""

    method: TrainingMethod = field(
        default="dsee",
        metadata={
            "help": "what is trained (recipes/methods.py): dsee = the DSEE update on dsee.target_modules; lora = PEFT "
            "LoRA of rank dsee.lora_rank on the same modules; supra = PEFT Supertuning's Supra (LoRA of rank "
            "dsee.lora_rank + the largest-|W| entries, as many in total as dsee.num_sparse per matrix); shira = PEFT "
            "SHiRA (a random sparse support of LoRA's parameter count); full = every weight (baselines, same "
            "trainer); supra and shira adapt nn.Linear modules only (not GPT-2's Conv1D)"
        },
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dsee: DSEEConfig = field(default_factory=DSEEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    resume: str | None = field(
        default=None,
        metadata={
            "help": "auto: continue from the newest complete checkpoint in output.dir (fresh start if none); "
            "a path: continue from that checkpoint; null: fresh start"
        },
    )
    # Directory of the YAML this config came from (for resolving relative paths); not a user key.
    source_dir: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source_dir")
        return data
