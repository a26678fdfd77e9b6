"""What is trained, per `method`: DSEE (the default), PEFT LoRA, PEFT Supertuning's Supra, PEFT SHiRA, or full
fine-tuning.

The trainer (recipes/finetune.py) is the same for all: same data, order, loss, optimizer and loop.
Only two steps differ and live here:

- `prepare_trainable`: wraps/freezes the loaded model and returns (the model to train, its trainable
  parameters). dsee: the DSEE layers of dsee/inject.py (done by the trainer's own DSEE set-up); lora:
  PEFT's own LoRA layers (`get_peft_model`) on the matched target modules, rank/alpha/dropout from
  `dsee.lora_*`; supra: PEFT's Supertuning layers with `r` set (LoRA rank `dsee.lora_rank` plus a sparse
  support of the largest |W| entries, as many in total as DSEE's `dsee.num_sparse` per matrix: `supra_budget`);
  shira: PEFT's SHiRA layers (a random sparse support of LoRA's size: r(in + out) entries per matrix with
  r = `dsee.lora_rank`); full: every parameter trainable.
- `save_trained`: writes the result. dsee: the DSEE adapter (dsee/adapter.py); lora, supra, shira: a PEFT
  adapter directory (`adapter/`, loadable with `PeftModel.from_pretrained`); full: a whole Hugging Face model
  (`merged/`, with the base model's tokenizer). Under ZeRO-3 each tensor is gathered one at a time and
  passed to the writer explicitly: PEFT's own `save_pretrained` on a partitioned model writes empty tensors.

ZeRO-3. Supertuning chooses its support from `base_layer.weight.data` when the layer is created: on a
partitioned model that is an empty placeholder, and stock PEFT stops with "sparsity=... leaves no trainable
entries for a weight with 0 elements" (tests/distributed/test_peft_sparse_methods.py asserts it). Here each
adapted weight is gathered, one matrix at a time, while PEFT's own `update_layer` runs on it, so the support is
the one ZeRO-0/2 choose. SHiRA's random mask needs only the shape. In the forward both read
`base_layer.weight` directly rather than calling the base layer; DeepSpeed's parameter getter gathers it there
(registering it as an external parameter of the adapted layer), so ZeRO-3 runs equal ZeRO-2's (same test).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import typing
from pathlib import Path

import torch

from dsee_dist.config.schema import TrainingMethod
from dsee_dist.engine import zero
from dsee_dist.errors import ConfigError
from dsee_dist.utils.files import atomic_directory

logger = logging.getLogger(__name__)

METHODS = typing.get_args(TrainingMethod)
PEFT_METHODS = ("lora", "supra", "shira")  # trained with PEFT's own layers, written as PEFT adapters
SUPRA_BUDGET_TOLERANCE = 0.01  # Supra's sparse total may differ from DSEE's by this fraction (module docstring)
PEFT_ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
EXPORT_REPORT = "dsee_export.json"  # beside a merged export: the real sparsity and the FLOPs per token


def method_of(cfg) -> str:
    """The configured method (`method` key of the config; `dsee` for configs written before it existed)."""
    method = getattr(cfg, "method", "dsee")
    if method not in METHODS:
        raise ConfigError(f"method '{method}' is not supported; choose one of: {', '.join(METHODS)}")
    return method


def lora_target_names(model, dsee_cfg) -> list[str]:
    """Full names of the modules PEFT LoRA adapts: the same matching as DSEE's (dsee.target_modules and
    dsee.exclude_modules). A fused GPT-2 c_attn is adapted as one matrix (PEFT has no q/v slices)."""
    from dsee_dist.dsee.inject import find_targets

    return [spec.name for spec in find_targets(model, dsee_cfg.target_modules, [], dsee_cfg.exclude_modules)]


def prepare_lora(model, dsee_cfg, seed: int):
    """(PeftModel, trainable parameters): PEFT's LoRA layers, rank `dsee.lora_rank`, on the target modules."""
    from peft import LoraConfig, get_peft_model

    from dsee_dist.dsee.layer import is_conv1d

    names = lora_target_names(model, dsee_cfg)
    fan_in_fan_out = any(is_conv1d(model.get_submodule(n)) for n in names)
    config = LoraConfig(
        r=dsee_cfg.lora_rank,
        lora_alpha=dsee_cfg.lora_alpha,
        lora_dropout=dsee_cfg.lora_dropout,
        target_modules=names,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # PEFT draws A from the global generator: the same A on every rank
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, trainable


def _linear_targets(model, dsee_cfg, method: str) -> list[str]:
    """The target names for a PEFT method that only adapts `nn.Linear` (Supertuning, SHiRA): a ConfigError
    names GPT-2's Conv1D (or any other layer type) up front, instead of PEFT's TypeError deep in injection."""
    names = lora_target_names(model, dsee_cfg)
    other = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names]
    other = [o for n, o in zip(names, other) if not isinstance(model.get_submodule(n), torch.nn.Linear)]
    if other:
        raise ConfigError(
            f"method={method} uses PEFT layers that adapt torch.nn.Linear only, not {', '.join(other[:3])}; "
            f"use method=dsee or method=lora for this model"
        )
    return names


def _dsee_sparse_total(model, dsee_cfg) -> int:
    """DSEE's sparse budget on this model: dsee.num_sparse per adapted matrix (per q/k/v slice of a fused
    projection, as DSEE counts them)."""
    from dsee_dist.dsee.inject import find_targets

    specs = find_targets(model, dsee_cfg.target_modules, dsee_cfg.fused_slices, dsee_cfg.exclude_modules)
    return dsee_cfg.num_sparse * sum(len(spec.slices) for spec in specs)


def supertuning_counts(numels: list[int], sparsity: float) -> list[int]:
    """Sparse entries per matrix that PEFT's Supertuning creates at `sparsity` (its own formula)."""
    from peft.tuners.supertuning.layer import SupertuningLayer

    return [SupertuningLayer._num_trainable(None, n, sparsity) for n in numels]


def supra_budget(numels: list[int], target: int) -> dict:
    """Supertuning's one `sparsity` for matrices of `numels` elements whose sparse total is nearest `target`
    (DSEE's N per matrix x matrices). Supertuning has one sparsity for all modules, so each matrix gets a
    share proportional to its size (SmolLM2's q_proj 576, v_proj 192 where DSEE has 384 each); the total is
    matched (exactly where the shapes allow). Returns {sparsity, counts, total, target}."""
    n_total = sum(numels)
    if target < len(numels) or target >= n_total:
        raise ConfigError(
            f"method=supra needs between {len(numels)} and {n_total - 1} sparse entries in total "
            f"(dsee.num_sparse x {len(numels)} matrices = {target})"
        )
    # The total is a step function of the kept fraction; it steps where n_i * fraction is an integer c.
    # Every step near the target is tried just above its edge (1e-9 relative: past the float rounding).
    candidates = set()
    for n in numels:
        centre = target * n / n_total
        for c in range(max(1, math.floor(centre) - len(numels) - 1), math.ceil(centre) + len(numels) + 2):
            candidates.add(1.0 - (c / n) * (1 + 1e-9))
    best = None
    for sparsity in sorted(candidates):
        if not 0.0 <= sparsity < 1.0:
            continue
        counts = supertuning_counts(numels, sparsity)
        if min(counts) < 1:
            continue
        key = (abs(sum(counts) - target), sum(counts))
        if best is None or key < best[0]:
            best = (key, sparsity, counts)
    _, sparsity, counts = best
    return {"sparsity": sparsity, "counts": counts, "total": sum(counts), "target": target}


@contextlib.contextmanager
def _gathered_during_update_layer(layer_cls):
    """PEFT's own `update_layer` of `layer_cls` runs with its base weight gathered (one matrix at a time under
    ZeRO-3; a no-op below): Supertuning picks its support from `weight.data`, a placeholder when partitioned."""
    original = layer_cls.update_layer

    def update_layer(self, *args, **kwargs):
        with zero.gathered([self.get_base_layer().weight]):
            return original(self, *args, **kwargs)

    layer_cls.update_layer = update_layer
    try:
        yield
    finally:
        layer_cls.update_layer = original


def _peft_model(model, config, layer_cls, seed: int):
    """(PeftModel, trainable parameters) for a PEFT config whose layers read their base weight at creation."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # LoRA A is drawn from the global generator: the same A on every rank
    with _gathered_during_update_layer(layer_cls):
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, trainable


def prepare_supra(model, dsee_cfg, seed: int):
    """(PeftModel, trainable parameters): PEFT's Supertuning with `r = dsee.lora_rank` (the Supra hybrid) on
    the target modules, its sparsity chosen so the sparse total equals DSEE's (`supra_budget`)."""
    from peft import SupertuningConfig
    from peft.tuners.supertuning.layer import SupertuningLayer

    from dsee_dist.dsee.layer import base_shape

    names = _linear_targets(model, dsee_cfg, "supra")
    numels = [math.prod(base_shape(model.get_submodule(n))) for n in names]
    budget = supra_budget(numels, _dsee_sparse_total(model, dsee_cfg))
    if abs(budget["total"] - budget["target"]) > SUPRA_BUDGET_TOLERANCE * budget["target"]:
        logger.warning(
            f"supra: {budget['total']:,} sparse entries is the nearest Supertuning's one sparsity gets to DSEE's "
            f"{budget['target']:,} on these shapes (more than {SUPRA_BUDGET_TOLERANCE:.0%} off)"
        )
    logger.info(
        f"supra: sparsity {budget['sparsity']:.6f} -> {budget['total']:,} sparse entries over {len(names)} "
        f"matrices (DSEE: {budget['target']:,}), LoRA rank {dsee_cfg.lora_rank}"
    )
    config = SupertuningConfig(
        target_modules=names,
        sparsity=budget["sparsity"],
        r=dsee_cfg.lora_rank,
        lora_alpha=dsee_cfg.lora_alpha,
        lora_dropout=dsee_cfg.lora_dropout,
        task_type="CAUSAL_LM",
    )
    return _peft_model(model, config, SupertuningLayer, seed)


def prepare_shira(model, dsee_cfg, seed: int):
    """(PeftModel, trainable parameters): PEFT's SHiRA with r = dsee.lora_rank (LoRA's count, r(in + out) per
    matrix, as single entries of a random mask seeded by train.seed: the same mask on every rank)."""
    from peft import ShiraConfig
    from peft.tuners.shira.layer import ShiraLayer

    names = _linear_targets(model, dsee_cfg, "shira")
    config = ShiraConfig(r=dsee_cfg.lora_rank, target_modules=names, random_seed=seed, task_type="CAUSAL_LM")
    return _peft_model(model, config, ShiraLayer, seed)


def prepare_full(model):
    """(model, all its parameters), every one trainable."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model, list(model.parameters())


def prepare_trainable(cfg, model):
    """(the model to train, its trainable parameters) for method `lora`, `supra`, `shira` or `full` (DSEE is set
    up by the trainer's own injection). Refuses what only DSEE supports: the two-stage pruning recipe."""
    method = method_of(cfg)
    if cfg.prune.method != "none":
        raise ConfigError(
            f"prune.method={cfg.prune.method} (the two-stage recipe) needs method=dsee, got "
            f"method={method}; set method=dsee or prune.method=none"
        )
    if method == "lora":
        return prepare_lora(model, cfg.dsee, cfg.train.seed)
    if method == "supra":
        return prepare_supra(model, cfg.dsee, cfg.train.seed)
    if method == "shira":
        return prepare_shira(model, cfg.dsee, cfg.train.seed)
    if method == "full":
        return prepare_full(model)
    raise ValueError(f"prepare_trainable handles {', '.join(PEFT_METHODS)} and full, not '{method}'")


def _gathered_state(named_params, is_rank_zero: bool) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of the named parameters on rank 0 (one ZeRO-3 gather per tensor; collective)."""
    state = {}
    for name, param in named_params:
        with zero.gathered([param]):
            if is_rank_zero:
                state[name] = param.detach().to("cpu", torch.float32, copy=True).contiguous()
    return state


def save_peft_adapter(peft_model, target: Path, *, base_model: str, is_rank_zero: bool) -> None:
    """Collective. Rank 0 writes a PEFT adapter directory (adapter_model.safetensors + adapter_config.json):
    the adapter's parameters and buffers (Supertuning's support indices; never partitioned), found by the
    tuner's name prefix (lora_, supertuning_, shira_), so a frozen model rebuilt for export writes the same."""
    prefix = peft_model.base_model.prefix
    state = _gathered_state([(n, p) for n, p in peft_model.named_parameters() if prefix in n], is_rank_zero)
    if not is_rank_zero:
        return
    state.update({n: b.detach().cpu() for n, b in peft_model.named_buffers() if prefix in n})
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    with atomic_directory(target) as tmp:
        peft_model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)


def save_full_model(model, target: Path, *, base_model: str, is_rank_zero: bool) -> None:
    """Collective. Rank 0 writes the whole fine-tuned model as an ordinary Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    from dsee_dist.models.loading import end_zero3_init

    state = _gathered_state(list(model.named_parameters()), is_rank_zero)
    if not is_rank_zero:
        return
    end_zero3_init()  # a whole model on rank 0, also after a ZeRO-3 run
    whole = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    missing, unexpected = whole.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied(whole)]
    if missing or unexpected:
        raise RuntimeError(f"full fine-tuning export: missing {missing[:3]}, unexpected {unexpected[:3]}")
    whole.config.use_cache = True
    save_hf_model(whole, base_model, Path(target))


def save_hf_model(model, base_model: str, target: Path, report: dict | None = None) -> None:
    """An ordinary Hugging Face directory: the model, the base model's tokenizer, a structurally pruned model's
    modeling file and the export report (EXPORT_REPORT); written atomically."""
    from transformers import AutoTokenizer

    from dsee_dist.pruning.structured import write_remote_code

    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if getattr(model.config, "auto_map", None):  # a structurally pruned model: ship its modeling file
            write_remote_code(tmp)
        try:
            AutoTokenizer.from_pretrained(base_model).save_pretrained(tmp)
        except (OSError, ValueError, TypeError):  # a base without a tokenizer: the model alone
            pass
        if report is not None:
            (tmp / EXPORT_REPORT).write_text(json.dumps(report, indent=1))


def _tied(model) -> set[str]:
    """Parameter names that are duplicates of another (tied embeddings): absent from named_parameters()."""
    unique = {n for n, _ in model.named_parameters()}
    return {n for n, _ in model.named_parameters(remove_duplicate=False) if n not in unique}


def save_trained(method: str, model, out_dir: Path, *, base_model: str, dsee_cfg, is_rank_zero: bool) -> Path:
    """Collective: write the training result into out_dir (adapter/ or merged/); returns its path."""
    out_dir = Path(out_dir)
    if method == "dsee":
        from dsee_dist.dsee.adapter import save_adapter

        save_adapter(model, out_dir / "adapter", base_model=base_model, dsee_cfg=dsee_cfg, is_rank_zero=is_rank_zero)
        target = out_dir / "adapter"
    elif method in PEFT_METHODS:
        target = out_dir / PEFT_ADAPTER_DIR
        save_peft_adapter(model, target, base_model=base_model, is_rank_zero=is_rank_zero)
    else:
        target = out_dir / MERGED_DIR
        save_full_model(model, target, base_model=base_model, is_rank_zero=is_rank_zero)
    if is_rank_zero:
        (out_dir / "trained.json").write_text(json.dumps({"method": method, "path": target.name}) + "\n")
    return target


def is_peft_adapter(path: str | os.PathLike) -> bool:
    config = Path(path) / "adapter_config.json"
    return config.is_file() and "peft_type" in json.loads(config.read_text())


def merge_peft_adapter(
    adapter_dir: str | os.PathLike, target: str | os.PathLike, base_model: str | None = None
) -> Path:
    """A PEFT adapter (LoRA, Supertuning, SHiRA) folded into its base model, written as an ordinary Hugging Face
    directory."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = base_model or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    save_hf_model(merged, base, Path(target))
    return Path(target)
