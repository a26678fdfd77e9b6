"""Validation of a built Config: everything checkable without loading a model.

Every check adds a problem (naming the key and the fix) to a list; `validate` raises them together in one
ConfigError. Choices (`Literal` fields of the schema) are checked generically; the section checks below
cover ranges and combinations.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

from dsee_dist.config.paths import resolve_path
from dsee_dist.config.schema import BUILTIN_MODELS, CHAT_ROLES, FORMAT_COLUMNS, Config, PruneConfig
from dsee_dist.errors import ConfigError


def raise_problems(problems: list[str]) -> None:
    """One ConfigError for every problem found (its message lists them all); nothing if there are none."""
    if not problems:
        return
    message = problems[0] if len(problems) == 1 else f"{len(problems)} problems in the config: " + "; ".join(problems)
    error = ConfigError(message)
    error.problems = list(problems)
    raise error


def _looks_like_hub_name(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/", "~")) and not os.path.exists(value)


def _literal_choices(tp) -> tuple | None:
    """The choices of a `Literal[...]` (or `Literal[...] | None`) type, else None."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    for arg in typing.get_args(tp) if typing.get_origin(tp) is not list else ():
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def check_choices(section, prefix: str, problems: list[str]) -> None:
    """Every `Literal` field (and list of `Literal`) of `section` and its sub-sections holds one of its choices."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, tp, key = getattr(section, f.name), hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(value):
            check_choices(value, key + ".", problems)
            continue
        if typing.get_origin(tp) is list:
            choices = _literal_choices(typing.get_args(tp)[0]) if typing.get_args(tp) else None
            if choices is None:
                continue
            bad = [item for item in value if item not in choices]
            if bad:
                problems.append(f"{key}: '{bad[0]}' is not supported; choose from: " + ", ".join(choices))
            continue
        choices = _literal_choices(tp)
        if choices is not None and value is not None and value not in choices:
            problems.append(f"{key} '{value}' is not supported; choose one of: " + ", ".join(choices))


def _check_model(cfg: Config, problems: list[str]) -> None:
    m = cfg.model
    if (m.path is None) == (m.builtin is None):
        problems.append(
            "set exactly one of model.path (a local Hugging Face directory) or model.builtin (one of: "
            + ", ".join(BUILTIN_MODELS)
            + ")"
        )
    if m.builtin is not None and m.builtin not in BUILTIN_MODELS:
        problems.append(
            f"model.builtin '{m.builtin}' is not a built-in model; choose one of: " + ", ".join(BUILTIN_MODELS)
        )
    if m.path is not None and not resolve_path(cfg, m.path).exists() and not _looks_like_hub_name(m.path):
        problems.append(f"model.path '{m.path}' does not exist; point it at a local Hugging Face model directory")
    if m.tokenizer_vocab_size < 300:
        problems.append(
            f"model.tokenizer_vocab_size must be at least 300 (byte-level BPE has 257 base symbols), "
            f"got {m.tokenizer_vocab_size}"
        )
    if m.dropout is not None and not 0.0 <= m.dropout < 1.0:
        problems.append(f"model.dropout must be in [0, 1) or null, got {m.dropout}")


def _check_data(cfg: Config, problems: list[str]) -> None:
    d = cfg.data
    if d.format != "synthetic_e2e":
        if not d.train_path:
            problems.append(f"data.train_path is required for data.format={d.format}")
        for key in ("train_path", "eval_path"):
            value = getattr(d, key)
            hub_ok = d.format != "text" and _looks_like_hub_name(value or "")
            if value and not resolve_path(cfg, value).exists() and not hub_ok:
                problems.append(
                    f"data.{key} '{value}' does not exist; give a local {d.format} file or directory"
                    + (" or a hub dataset name" if d.format != "text" else "")
                )
    known = FORMAT_COLUMNS.get(d.format, ())
    for name in d.fields:
        if name not in known:
            problems.append(
                f"data.fields: '{name}' is not a column of data.format={d.format}"
                + (f"; its columns are: {', '.join(known)}" if known else " (it reads no named columns)")
            )
    for name, role in d.roles.items():
        if role not in CHAT_ROLES:
            problems.append(f"data.roles: '{name}' maps to '{role}'; map it to one of: {', '.join(CHAT_ROLES)}")
    if d.packing and d.group_by_length:
        problems.append("data.packing and data.group_by_length are alternatives (packed rows are all near block_size)")
    if d.packing and d.format == "text":
        problems.append("data.format=text is packed into full blocks already; leave data.packing false")
    if d.num_proc < 1:
        problems.append(f"data.num_proc must be >= 1, got {d.num_proc}")
    if d.block_size < 8:
        problems.append(f"data.block_size must be at least 8, got {d.block_size}")
    for key in ("max_train_examples", "max_eval_examples", "synthetic_train_examples", "synthetic_eval_examples"):
        if getattr(d, key) < 0:
            problems.append(f"data.{key} must be >= 0, got {getattr(d, key)}")


def _check_dsee(cfg: Config, problems: list[str]) -> None:
    s = cfg.dsee
    if s.lora_rank < 1:
        problems.append(f"dsee.lora_rank must be >= 1, got {s.lora_rank}")
    if s.lora_alpha <= 0:
        problems.append(f"dsee.lora_alpha must be > 0, got {s.lora_alpha}")
    if not 0.0 <= s.lora_dropout < 1.0:
        problems.append(f"dsee.lora_dropout must be in [0, 1), got {s.lora_dropout}")
    if s.num_sparse < 0:
        problems.append(f"dsee.num_sparse must be >= 0 (0 = plain LoRA), got {s.num_sparse}")
    dc = s.decomposition
    for key in ("rank_step", "outer_iters", "inner_iters"):
        if getattr(dc, key) < 1:
            problems.append(f"dsee.decomposition.{key} must be >= 1, got {getattr(dc, key)}")
    if dc.threshold < 0:
        problems.append(f"dsee.decomposition.threshold must be >= 0, got {dc.threshold}")
    if not s.target_modules:
        problems.append("dsee.target_modules is empty; name at least one module to adapt, e.g. [c_attn]")
    if len(set(s.fused_slices)) != len(s.fused_slices):
        problems.append(f"dsee.fused_slices must be distinct entries of q, k, v; got {s.fused_slices}")


def _check_train(cfg: Config, problems: list[str]) -> None:
    t = cfg.train
    if t.max_steps < 0 or t.epochs < 0 or (t.max_steps > 0) == (t.epochs > 0):
        problems.append("set exactly one of train.max_steps or train.epochs to a positive value")
    if t.lr <= 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")
    for key in ("micro_batch_size", "grad_accum_steps", "log_every_n_steps"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.warmup_steps < 0 or t.grad_clip < 0 or t.weight_decay < 0 or t.stop_after_steps < 0:
        problems.append(
            "train.warmup_steps, train.grad_clip, train.weight_decay and train.stop_after_steps must be >= 0"
        )
    if len(t.adam_betas) != 2 or not all(0 <= b < 1 for b in t.adam_betas):
        problems.append(f"train.adam_betas must be two numbers in [0, 1), got {t.adam_betas}")
    e = cfg.eval
    if e.every_n_steps < 0 or e.max_batches < 0 or e.micro_batch_size < 1:
        problems.append("eval.every_n_steps and eval.max_batches must be >= 0 and eval.micro_batch_size >= 1")


def _check_run(cfg: Config, problems: list[str]) -> None:
    if not resolve_path(cfg, cfg.deepspeed.config).is_file():
        problems.append(f"deepspeed.config '{cfg.deepspeed.config}' does not exist; use one of configs/ds/*.json")
    if cfg.deepspeed.timeout_s < 1:
        problems.append(f"deepspeed.timeout_s must be >= 1 second, got {cfg.deepspeed.timeout_s}")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep_last < 0:
        problems.append("checkpoint.every and checkpoint.keep_last must be >= 0")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).exists():
        problems.append(f"resume '{cfg.resume}' does not exist; use resume=auto or the path of a checkpoint directory")
    if not cfg.output.dir:
        problems.append("output.dir is empty; give a directory for checkpoints, metrics and the adapter")


def _check_prune(cfg: Config, problems: list[str]) -> None:
    p: PruneConfig = cfg.prune
    if p.method == "none":
        return
    ratios = {
        "prune.ratio": p.ratio,
        "prune.head_ratio": p.head_ratio,
        "prune.mlp_ratio": p.mlp_ratio,
        **{f"prune.group_ratios.{k}": v for k, v in p.group_ratios.items()},
    }
    for key, value in ratios.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            problems.append(f"{key} must be a fraction in [0, 1) (the share removed), got {value!r}")
    if p.heads_removed < 0:
        problems.append(f"prune.heads_removed must be >= 0, got {p.heads_removed}")
    if p.heads_removed and p.head_ratio:
        problems.append("set at most one of prune.heads_removed and prune.head_ratio")
    if p.pattern is not None:
        if p.method != "unstructured":
            problems.append(f"prune.pattern applies to prune.method=unstructured, not {p.method}; remove it")
        elif p.nm_pattern is None:
            problems.append(
                f"prune.pattern must be 'N:M' with whole numbers 1 <= N < M (N of every M consecutive input "
                f"weights kept, e.g. '2:4'), got {p.pattern!r}"
            )
        elif p.group_ratios:
            problems.append("prune.pattern fixes the share removed (1 - N/M); remove prune.group_ratios")
    if p.method == "unstructured" and not p.modules:
        problems.append("prune.modules is empty; name the module kinds to prune, e.g. [attn_q, attn_v, mlp_in]")
    if p.calibrates and p.calibration_examples < 1:
        problems.append(
            f"prune.calibration_examples must be >= 1 for the activation score, got {p.calibration_examples}"
        )
    if p.method == "unstructured" and p.grouping == "row" and set(p.group_ratios) - {"adapted", "frozen"}:
        problems.append(
            "prune.grouping=row takes group_ratios only for the adaptation groups 'adapted' and 'frozen', got "
            + ", ".join(sorted(set(p.group_ratios) - {"adapted", "frozen"}))
        )
    if p.method == "structured" and not (p.heads_removed or p.head_ratio or p.mlp_ratio):
        problems.append(
            "prune.method=structured removes nothing; set prune.heads_removed, prune.head_ratio or prune.mlp_ratio"
        )
    if not p.tune_first:
        key, score = ("head_score", p.head_score) if p.method == "structured" else ("score", p.score)
        if "delta" in score:
            problems.append(
                f"prune.tune_first=false prunes the pretrained weights, which have no tuned update for "
                f"prune.{key}={score} to score; use prune.{key}=activation" + (" (or base)" if key == "score" else "")
            )
    if p.retrain_steps < 0 or p.retrain_epochs < 0 or (p.retrain_steps > 0) == (p.retrain_epochs > 0):
        problems.append(
            "set exactly one of prune.retrain_steps or prune.retrain_epochs to a positive value (stage 2 length)"
        )
    if p.retrain_lr is not None and p.retrain_lr <= 0:
        problems.append(f"prune.retrain_lr must be > 0 or null, got {p.retrain_lr}")
    if p.flops_context < 1:
        problems.append(f"prune.flops_context must be >= 1, got {p.flops_context}")
    if cfg.resume not in (None, "auto"):
        problems.append(
            "a two-stage (prune.method != none) run resumes by itself from its output directory; "
            "use resume=auto (or null to start over), not a checkpoint path"
        )


def _check_generation(cfg: Config, problems: list[str]) -> None:
    """Decoding settings and the combinations generation during training needs (before any model is loaded)."""
    g, e = cfg.generate, cfg.eval
    for key in ("num_beams", "max_new_tokens", "batch_size"):
        if getattr(g, key) < 1:
            problems.append(f"generate.{key} must be at least 1, got {getattr(g, key)}")
    if g.no_repeat_ngram_size < 0:
        problems.append(f"generate.no_repeat_ngram_size must be 0 (off) or more, got {g.no_repeat_ngram_size}")
    if e.generate_every_n_steps < 0 or e.generate_max_examples < 1:
        problems.append("eval.generate_every_n_steps must be >= 0 and eval.generate_max_examples >= 1")
    wants = e.generate_every_n_steps > 0 or e.final_generate
    if wants and cfg.data.format not in ("e2e", "synthetic_e2e"):
        problems.append(
            "eval.generate_every_n_steps / eval.final_generate need E2E data (data.format e2e or "
            f"synthetic_e2e), not {cfg.data.format}"
        )
    if wants and cfg.data.format == "e2e" and not cfg.data.eval_path:
        problems.append(
            "eval.generate_every_n_steps / eval.final_generate need data.eval_path: a local E2E CSV "
            "with references (mr,ref)"
        )
    if cfg.checkpoint.keep_best and e.generate_every_n_steps <= 0:
        problems.append(f"checkpoint.keep_best={cfg.checkpoint.keep_best} needs eval.generate_every_n_steps > 0")
    if cfg.train.loss_chunk_tokens < 0:
        problems.append(f"train.loss_chunk_tokens must be >= 0 (0 = plain loss), got {cfg.train.loss_chunk_tokens}")


SECTION_CHECKS = (_check_model, _check_data, _check_dsee, _check_train, _check_run, _check_prune, _check_generation)


def collect_problems(cfg: Config) -> list[str]:
    """Every problem of `cfg`, in section order (empty if it is valid)."""
    problems: list[str] = []
    check_choices(cfg, "", problems)
    for check in SECTION_CHECKS:
        check(cfg, problems)
    return problems


def validate(cfg: Config) -> None:
    """Raise one ConfigError listing every problem of `cfg`."""
    raise_problems(collect_problems(cfg))
