"""Experiment configuration. Never imports torch or deepspeed, so a bad config fails in well under a second.

- `schema.py`: the dataclasses (one per YAML section; `Literal` choices, one-line help per key), the choice
  lists derived from them, and derived values (`global_batch_size`).
- `loading.py`: YAML files with `extends:`, dotted overrides, type checking, dump (validates what it builds).
- `paths.py`: where a relative path in a config points (`resolve_path`).
- `validation.py`: every problem of a config collected and raised together in one ConfigError.

One owner per knob: the YAML holds the science (model, data, DSEE, optimisation); the DeepSpeed JSON named
by `deepspeed.config` holds only engine settings (ZeRO stage, precision, offload, buckets). Batch sizes and
gradient clipping live here and are written into the DeepSpeed config by the engine.
"""

from dsee_dist.config.loading import (
    config_from_dict,
    dump_yaml,
    load_config,
    merge_nested,
    parse_overrides,
    resolve_extends,
)
from dsee_dist.config.paths import resolve_path
from dsee_dist.config.schema import (
    DATA_FORMATS,
    FUSED_SLICE_NAMES,
    LR_SCHEDULES,
    PRUNE_GROUPINGS,
    PRUNE_HEAD_SCORES,
    PRUNE_METHODS,
    PRUNE_MODULE_KINDS,
    PRUNE_SCORES,
    SUPPORT_METHODS,
    CheckpointConfig,
    Config,
    DataConfig,
    DecompositionConfig,
    DeepSpeedSection,
    DSEEConfig,
    EvalConfig,
    ModelConfig,
    OutputConfig,
    PruneConfig,
    TrainConfig,
    global_batch_size,
)
from dsee_dist.config.validation import collect_problems, validate

__all__ = [
    "CheckpointConfig",
    "Config",
    "DATA_FORMATS",
    "DSEEConfig",
    "DataConfig",
    "DecompositionConfig",
    "DeepSpeedSection",
    "EvalConfig",
    "FUSED_SLICE_NAMES",
    "LR_SCHEDULES",
    "ModelConfig",
    "OutputConfig",
    "PRUNE_GROUPINGS",
    "PRUNE_HEAD_SCORES",
    "PRUNE_METHODS",
    "PRUNE_MODULE_KINDS",
    "PRUNE_SCORES",
    "PruneConfig",
    "SUPPORT_METHODS",
    "TrainConfig",
    "collect_problems",
    "config_from_dict",
    "dump_yaml",
    "global_batch_size",
    "load_config",
    "merge_nested",
    "parse_overrides",
    "resolve_extends",
    "resolve_path",
    "validate",
]
