"""Experiment configuration: dataclasses, YAML loading, dotted overrides and validation.

One owner per knob. The YAML holds the science (model, data, DSEE, optimisation); the DeepSpeed
JSON named by `deepspeed.config` holds only engine settings (ZeRO stage, precision, offload,
buckets). Batch sizes and gradient clipping live here and are written into the DeepSpeed config
by `distributed.build_deepspeed_config`.

This module never imports torch or deepspeed, so a bad config fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsee_dist.errors import ConfigError

SUPPORT_METHODS = ("decomposition", "magnitude", "random")
DATA_FORMATS = ("synthetic_e2e", "e2e", "text", "jsonl")
LR_SCHEDULES = ("constant", "linear", "cosine")
FUSED_SLICE_NAMES = ("q", "k", "v")
PRUNE_METHODS = ("none", "unstructured", "structured")
PRUNE_SCORES = ("delta", "merged", "base", "random")
PRUNE_HEAD_SCORES = ("delta", "delta+base")
PRUNE_GROUPINGS = ("adaptation", "kind", "global")
PRUNE_MODULE_KINDS = ("attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_out")


@dataclass
class ModelConfig:
    """Which pretrained decoder to adapt."""

    # A local Hugging Face model directory (or, with hub access, a hub name). Exclusive with `builtin`.
    path: str | None = None
    # A named small configuration built in to dsee_dist (see models.BUILTIN_MODELS), randomly
    # initialised from `train.seed`, with a tokenizer trained locally on the training data.
    builtin: str | None = None
    # Vocabulary size of the locally trained tokenizer (built-in models only).
    tokenizer_vocab_size: int = 512
    # Overrides the model's own dropout probabilities (GPT-2 resid/embd/attn_pdrop, attention_dropout, ...);
    # null keeps the model's values.
    dropout: float | None = None


@dataclass
class DataConfig:
    """Training and evaluation data."""

    # synthetic_e2e: a generated E2E-style task written by dsee_dist itself (no download).
    # e2e: CSV with columns mr,ref (or a hub dataset name); loss only on the reference.
    # text: plain text packed into blocks. jsonl: {"prompt": ..., "completion": ...} per line.
    format: str = "synthetic_e2e"
    train_path: str | None = None
    eval_path: str | None = None
    # Maximum sequence length (E2E / JSONL examples are truncated to it; text is packed into blocks of it).
    block_size: int = 128
    # Use at most this many training / evaluation examples (0 = all).
    max_train_examples: int = 0
    max_eval_examples: int = 0
    # Size of the generated task (synthetic_e2e only).
    synthetic_train_examples: int = 2000
    synthetic_eval_examples: int = 200


@dataclass
class DecompositionConfig:
    """Parameters of the sparse + low-rank decomposition that picks the sparse support (METHOD.md §2)."""

    # `fast`: the same greedy bilateral algorithm with larger rank steps and a thin QR
    # (see dsee/support.py); `reference`: the reference schedule step for step.
    algorithm: str = "fast"
    rank_step: int = 5
    outer_iters: int = 100
    inner_iters: int = 2
    threshold: float = 0.01


@dataclass
class DSEEConfig:
    """The adapted layers: y = W0 x + b + (alpha/r) B A drop(x) + (alpha/r) S x."""

    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    # N: trainable sparse entries per adapted matrix (per q/k/v slice of a fused projection). 0 = plain LoRA.
    num_sparse: int = 16
    # How the N positions are chosen from the pretrained weight.
    support: str = "decomposition"
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    # Module names to adapt, PEFT-style: an entry matches a module whose full name equals it or
    # ends with "." + entry; an entry starting with "re:" is a regular expression (full match).
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"])
    # For fused q/k/v projections (GPT-2 `c_attn`): which slices to adapt, each as its own matrix.
    # Empty list = adapt the fused matrix as one.
    fused_slices: list[str] = field(default_factory=lambda: ["q", "v"])
    # Module names never adapted, even if a target matches (same matching rules).
    exclude_modules: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    seed: int = 42
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "linear"
    warmup_steps: int = 0
    # Exactly one of max_steps / epochs is non-zero.
    max_steps: int = 0
    epochs: float = 0.0
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    # 0 disables clipping.
    grad_clip: float = 1.0
    log_every_n_steps: int = 1
    # Stop with a checkpoint after this many optimizer steps of this job (0 = run to the end); for
    # time-boxed allocations: the next job continues with resume=auto.
    stop_after_steps: int = 0


@dataclass
class EvalConfig:
    # Perplexity on the evaluation set every K optimizer steps (0 = only at the end).
    every_n_steps: int = 0
    micro_batch_size: int = 8
    # Evaluate on at most this many batches per rank (0 = the whole evaluation set).
    max_batches: int = 0


@dataclass
class CheckpointConfig:
    # Save a sharded checkpoint every N optimizer steps (0 = only at the end and on preemption).
    every: int = 0
    # Keep the newest K complete checkpoints (0 = keep all).
    keep_last: int = 2


@dataclass
class PruneConfig:
    """The two-stage recipe (METHOD.md §3): stage 1 tunes A, B, S for `train.*` steps; the final weights
    are pruned; stage 2 re-tunes A, B, S on the pruned base for `retrain_*` steps. `none` = one stage."""

    method: str = "none"
    # --- unstructured: remove `ratio` of the entries of each group, ranked globally within the group.
    # delta: |ΔW| for adapted matrices, |W0| for the others (the reference's ABS); merged: |W0 + ΔW|;
    # base: |W0|; random.
    score: str = "delta"
    ratio: float = 0.2
    # adaptation: two groups, "adapted" and "frozen" (the reference); kind: one group per module kind; global.
    grouping: str = "adaptation"
    # Per-group ratios overriding `ratio`, e.g. {adapted: 0.3, frozen: 0.2}.
    group_ratios: dict = field(default_factory=dict)
    # Prunable module kinds (embeddings and the LM head never are).
    modules: list[str] = field(default_factory=lambda: list(PRUNE_MODULE_KINDS))
    # --- structured: per layer, remove `heads_removed` heads (or round(head_ratio * heads)) and
    # round(mlp_ratio * inner) MLP neurons, the lowest-scoring ones.
    heads_removed: int = 0
    head_ratio: float = 0.0
    mlp_ratio: float = 0.0
    # delta: sum of |ΔW| over a head's q and v rows (a neuron's c_fc row and c_proj column), |W0| where not
    # adapted; delta+base adds |W0|.
    head_score: str = "delta"
    # --- stage 2: exactly one of retrain_steps / retrain_epochs; retrain_lr null = train.lr.
    retrain_steps: int = 0
    retrain_epochs: float = 0.0
    retrain_lr: float | None = None
    # Context length the FLOPs report assumes.
    flops_context: int = 128


@dataclass
class OutputConfig:
    dir: str = "runs/dsee"


@dataclass
class DeepSpeedSection:
    # DeepSpeed JSON with engine settings only. Relative paths are tried against the working
    # directory first, then against the directory of the experiment YAML, then the repository.
    config: str = "configs/ds/zero3_fp32.json"
    # Nested values merged over the JSON (`ds.zero_optimization.stage=2` on the command line).
    overrides: dict = field(default_factory=dict)
    # A collective that waits this long for another rank fails the job with a clear error instead of
    # hanging (a lost node, a cut network). Keep it above the longest checkpoint save or support computation.
    timeout_s: int = 1800


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dsee: DSEEConfig = field(default_factory=DSEEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    # `auto`: continue from the newest complete checkpoint in output.dir (fresh start if none);
    # a path: continue from that checkpoint; null: fresh start.
    resume: str | None = None
    # Directory of the YAML this config came from (for resolving relative paths); not a user key.
    source_dir: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source_dir")
        return data


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts, with type checking and unknown-key errors.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list or tp is list:
        if isinstance(value, str):  # allow `dsee.target_modules=c_attn,c_proj` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, key) for v in value] if inner is not Any else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    public = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(public))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: "
            + ", ".join(prefix + k for k in public)
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=1 ds.zero_optimization.stage=3` -> nested dict; `ds.` keys go under deepspeed.overrides."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.max_steps=20)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if key.startswith("ds."):
            _set_dotted(tree, "deepspeed.overrides." + key[3:], value)
        else:
            _set_dotted(tree, key, value)
    return tree


def merge_nested(base: dict, extra: dict) -> dict:
    """`extra` merged over `base`, recursing into mappings present in both."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_nested(out[key], value)
        else:
            out[key] = value
    return out


def resolve_extends(path: Path, data: dict, seen: tuple = ()) -> dict:
    """`extends: other.yaml` (relative to this file): this file's sections merged over that one's."""
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = (path.resolve().parent / str(parent)).resolve()
    if parent_path in seen or parent_path == path.resolve():
        raise ConfigError(f"config file '{path}' extends itself through '{parent}'; remove the cycle")
    if not parent_path.is_file():
        raise ConfigError(f"config file '{path}' extends '{parent}', which does not exist next to it")
    base = yaml.safe_load(parent_path.read_text()) or {}
    base = resolve_extends(parent_path, base, seen + (path.resolve(),))
    return merge_nested(base, data)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment config, apply dotted overrides, validate. Raises ConfigError."""
    data: dict = {}
    source_dir = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML, e.g. --config configs/quickstart.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix its syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, dsee:, ...)")
        data = resolve_extends(path, data)
        source_dir = str(path.resolve().parent)
    data = merge_nested(data, parse_overrides(list(overrides)))
    cfg = _build(Config, data)
    cfg.source_dir = source_dir
    validate(cfg)
    return cfg


def config_from_dict(data: dict, validate: bool = True) -> Config:
    """A Config from a resolved dict (e.g. a checkpoint's). `validate=False` skips the file checks,
    for configs recorded on another machine."""
    cfg = _build(Config, data)
    if validate:
        globals()["validate"](cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation: everything checkable without loading a model. Errors name the key and the fix.


def resolve_path(cfg: Config, value: str) -> Path:
    """A relative path from the config: working directory first, then the YAML's directory, then the repo."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for base in (cfg.source_dir, str(Path(__file__).resolve().parent.parent)):
        if base and (Path(base) / p).exists():
            return Path(base) / p
    return p


def _looks_like_hub_name(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not os.path.exists(value)


def validate(cfg: Config) -> None:
    m, d, s, t = cfg.model, cfg.data, cfg.dsee, cfg.train
    from dsee_dist.models.loading import BUILTIN_MODELS  # light module: no torch at import

    if (m.path is None) == (m.builtin is None):
        raise ConfigError("set exactly one of model.path (a local Hugging Face directory) or model.builtin (one of: "
                          + ", ".join(BUILTIN_MODELS) + ")")
    if m.builtin is not None and m.builtin not in BUILTIN_MODELS:
        raise ConfigError(f"model.builtin '{m.builtin}' is not a built-in model; choose one of: " + ", ".join(BUILTIN_MODELS))
    if m.path is not None and not resolve_path(cfg, m.path).exists() and not _looks_like_hub_name(m.path):
        raise ConfigError(f"model.path '{m.path}' does not exist; point it at a local Hugging Face model directory")
    if m.tokenizer_vocab_size < 300:
        raise ConfigError(f"model.tokenizer_vocab_size must be at least 300 (byte-level BPE has 257 base symbols), "
                          f"got {m.tokenizer_vocab_size}")

    if m.dropout is not None and not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1) or null, got {m.dropout}")
    if d.format not in DATA_FORMATS:
        raise ConfigError(f"data.format '{d.format}' is not supported; choose one of: " + ", ".join(DATA_FORMATS))
    if d.format != "synthetic_e2e":
        if not d.train_path:
            raise ConfigError(f"data.train_path is required for data.format={d.format}")
        for key in ("train_path", "eval_path"):
            value = getattr(d, key)
            if value and not resolve_path(cfg, value).exists() and not (d.format == "e2e" and _looks_like_hub_name(value)):
                raise ConfigError(f"data.{key} '{value}' does not exist; give the path of a local {d.format} file")
    if d.block_size < 8:
        raise ConfigError(f"data.block_size must be at least 8, got {d.block_size}")
    for key in ("max_train_examples", "max_eval_examples", "synthetic_train_examples", "synthetic_eval_examples"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key} must be >= 0, got {getattr(d, key)}")

    if s.lora_rank < 1:
        raise ConfigError(f"dsee.lora_rank must be >= 1, got {s.lora_rank}")
    if s.lora_alpha <= 0:
        raise ConfigError(f"dsee.lora_alpha must be > 0, got {s.lora_alpha}")
    if not 0.0 <= s.lora_dropout < 1.0:
        raise ConfigError(f"dsee.lora_dropout must be in [0, 1), got {s.lora_dropout}")
    if s.num_sparse < 0:
        raise ConfigError(f"dsee.num_sparse must be >= 0 (0 = plain LoRA), got {s.num_sparse}")
    if s.support not in SUPPORT_METHODS:
        raise ConfigError(f"dsee.support '{s.support}' is not a support method; choose one of: " + ", ".join(SUPPORT_METHODS))
    dc = s.decomposition
    if dc.algorithm not in ("fast", "reference"):
        raise ConfigError(f"dsee.decomposition.algorithm '{dc.algorithm}' must be 'fast' or 'reference'")
    for key in ("rank_step", "outer_iters", "inner_iters"):
        if getattr(dc, key) < 1:
            raise ConfigError(f"dsee.decomposition.{key} must be >= 1, got {getattr(dc, key)}")
    if dc.threshold < 0:
        raise ConfigError(f"dsee.decomposition.threshold must be >= 0, got {dc.threshold}")
    if not s.target_modules:
        raise ConfigError("dsee.target_modules is empty; name at least one module to adapt, e.g. [c_attn]")
    bad = [x for x in s.fused_slices if x not in FUSED_SLICE_NAMES]
    if bad or len(set(s.fused_slices)) != len(s.fused_slices):
        raise ConfigError(f"dsee.fused_slices must be distinct entries of q, k, v; got {s.fused_slices}")

    if t.max_steps < 0 or t.epochs < 0 or (t.max_steps > 0) == (t.epochs > 0):
        raise ConfigError("set exactly one of train.max_steps or train.epochs to a positive value")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if t.schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.schedule '{t.schedule}' is not supported; choose one of: " + ", ".join(LR_SCHEDULES))
    for key in ("micro_batch_size", "grad_accum_steps", "log_every_n_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.warmup_steps < 0 or t.grad_clip < 0 or t.weight_decay < 0 or t.stop_after_steps < 0:
        raise ConfigError("train.warmup_steps, train.grad_clip, train.weight_decay and train.stop_after_steps must be >= 0")
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {t.adam_betas}")
    if cfg.eval.every_n_steps < 0 or cfg.eval.max_batches < 0 or cfg.eval.micro_batch_size < 1:
        raise ConfigError("eval.every_n_steps and eval.max_batches must be >= 0 and eval.micro_batch_size >= 1")

    ds_path = resolve_path(cfg, cfg.deepspeed.config)
    if not ds_path.is_file():
        raise ConfigError(f"deepspeed.config '{cfg.deepspeed.config}' does not exist; use one of configs/ds/*.json")
    if cfg.deepspeed.timeout_s < 1:
        raise ConfigError(f"deepspeed.timeout_s must be >= 1 second, got {cfg.deepspeed.timeout_s}")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 0:
        raise ConfigError("checkpoint.every and checkpoint.keep_last must be >= 0")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume '{cfg.resume}' does not exist; use resume=auto or the path of a checkpoint directory")
    if not cfg.output.dir:
        raise ConfigError("output.dir is empty; give a directory for checkpoints, metrics and the adapter")
    validate_prune(cfg)


def validate_prune(cfg: Config) -> None:
    p = cfg.prune
    if p.method not in PRUNE_METHODS:
        raise ConfigError(f"prune.method '{p.method}' is not supported; choose one of: " + ", ".join(PRUNE_METHODS))
    if p.method == "none":
        return
    if p.score not in PRUNE_SCORES:
        raise ConfigError(f"prune.score '{p.score}' is not supported; choose one of: " + ", ".join(PRUNE_SCORES))
    if p.head_score not in PRUNE_HEAD_SCORES:
        raise ConfigError(f"prune.head_score '{p.head_score}' is not supported; choose one of: " + ", ".join(PRUNE_HEAD_SCORES))
    if p.grouping not in PRUNE_GROUPINGS:
        raise ConfigError(f"prune.grouping '{p.grouping}' is not supported; choose one of: " + ", ".join(PRUNE_GROUPINGS))
    for kind in p.modules:
        if kind not in PRUNE_MODULE_KINDS:
            raise ConfigError(f"prune.modules: '{kind}' is not a prunable module kind; choose from: " + ", ".join(PRUNE_MODULE_KINDS))
    ratios = {"prune.ratio": p.ratio, "prune.head_ratio": p.head_ratio, "prune.mlp_ratio": p.mlp_ratio,
              **{f"prune.group_ratios.{k}": v for k, v in p.group_ratios.items()}}
    for key, value in ratios.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be a fraction in [0, 1) (the share removed), got {value!r}")
    if p.heads_removed < 0:
        raise ConfigError(f"prune.heads_removed must be >= 0, got {p.heads_removed}")
    if p.heads_removed and p.head_ratio:
        raise ConfigError("set at most one of prune.heads_removed and prune.head_ratio")
    if p.method == "unstructured" and not p.modules:
        raise ConfigError("prune.modules is empty; name the module kinds to prune, e.g. [attn_q, attn_v, mlp_in]")
    if p.method == "structured" and not (p.heads_removed or p.head_ratio or p.mlp_ratio):
        raise ConfigError("prune.method=structured removes nothing; set prune.heads_removed, prune.head_ratio or prune.mlp_ratio")
    if p.retrain_steps < 0 or p.retrain_epochs < 0 or (p.retrain_steps > 0) == (p.retrain_epochs > 0):
        raise ConfigError("set exactly one of prune.retrain_steps or prune.retrain_epochs to a positive value (stage 2 length)")
    if p.retrain_lr is not None and p.retrain_lr <= 0:
        raise ConfigError(f"prune.retrain_lr must be > 0 or null, got {p.retrain_lr}")
    if p.flops_context < 1:
        raise ConfigError(f"prune.flops_context must be >= 1, got {p.flops_context}")
    if cfg.resume not in (None, "auto"):
        raise ConfigError("a two-stage (prune.method != none) run resumes by itself from its output directory; "
                          "use resume=auto (or null to start over), not a checkpoint path")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
