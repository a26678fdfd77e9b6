"""The two-stage recipe from one config (METHOD.md §3): stage 1 tunes A, B, S on the pretrained base;
the final weights are pruned; stage 2 re-tunes A, B, S on the pruned base; the result is exported.

    output.dir/
        stage1/          a complete DSEE run: checkpoints/, metrics.jsonl, support, adapter/
        pruned_base/     the pruned base model (written by all ranks, renamed when complete)
        stage2/          the re-tuning run on pruned_base/, started from stage 1's adapter
        final/           merged, pruned Hugging Face model + dsee_export.json (sparsity, FLOPs)

Every part is resumable with resume=auto: a finished stage is recognised by its adapter/, the pruning
by pruned_base/ (both written atomically), and a stage in progress resumes from its own checkpoints.

The path: `tune_prune_retune` -> check_request -> stage 1 (`finetune.train`: setup -> fit -> evaluate_loss
-> save) -> prune (`prune_model`) -> FLOPs report -> stage 2 (`finetune.train` on the pruned base, from the
stage-1 adapter) -> `export_final`. recipes/run.py hands a run over here when prune.method != none.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from dsee_dist.config import Config
from dsee_dist.dsee.adapter import ADAPTER_CONFIG, read_adapter
from dsee_dist.engine import process_group
from dsee_dist.engine.checkpoint import find_resume_checkpoint
from dsee_dist.errors import DSEEError
from dsee_dist.models.flops import compare, flops_per_token, format_report
from dsee_dist.pruning.structured import prune_structured, slice_adapter
from dsee_dist.pruning.unstructured import prune_unstructured
from dsee_dist.recipes import finetune
from dsee_dist.utils.files import write_text_atomic

logger = logging.getLogger(__name__)
log = logger.info  # passed to helpers that take a `log` callable

STAGE1, PRUNED, STAGE2, FINAL = "stage1", "pruned_base", "stage2", "final"
CALIBRATION = "calibration"  # a scratch directory while the activation score calibrates


def tune_and_retune_configs(cfg: Config, out_dir: Path) -> tuple[Config, Config]:
    """(stage 1's config: tuning into stage1/; stage 2's: re-tuning on the pruned base into stage2/, with the
    prune.retrain_* step count and learning rate, resumed where it stopped)."""
    p = cfg.prune
    stage1 = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(out_dir / STAGE1)))
    stage2 = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=str((out_dir / PRUNED).resolve()), builtin=None, gguf_file=None),
        train=dataclasses.replace(
            cfg.train, max_steps=p.retrain_steps, epochs=p.retrain_epochs, lr=p.retrain_lr or cfg.train.lr
        ),
        output=dataclasses.replace(cfg.output, dir=str(out_dir / STAGE2)),
        resume="auto",
    )
    return stage1, stage2


def check_request(prune_cfg, base_model: str) -> None:
    """Refuse a pruning request the model cannot satisfy before any training (ConfigError)."""
    from transformers import AutoConfig

    from dsee_dist.models.pruned_gpt2 import register
    from dsee_dist.pruning.structured import check_structured_request
    from dsee_dist.pruning.targets import prunable_matrices

    register()
    if not Path(base_model).is_dir():
        raise DSEEError(
            f"pruning reads the base model's files, and '{base_model}' is not a local directory; "
            f"download it (e.g. huggingface-cli download) and set model.path to the directory"
        )
    model_config = AutoConfig.from_pretrained(base_model)
    if prune_cfg.method == "structured":
        check_structured_request(prune_cfg, model_config)
    else:
        prunable_matrices(model_config, prune_cfg.modules)


def tune_prune_retune(cfg: Config, ctx: finetune.RunContext) -> tuple[int, bool]:
    """Both stages and the pruning between them into output.dir. Returns (exit status, whether finished)."""
    out_dir, base_model, dist_info = ctx.out_dir, ctx.base_model, ctx.dist_info
    check_request(cfg.prune, base_model)
    cfg1, cfg2 = tune_and_retune_configs(cfg, out_dir)
    pruned_dir = out_dir / PRUNED
    if cfg.resume is None and dist_info.is_rank_zero:  # a fresh start: nothing of an earlier run is reused
        for name in (STAGE1, CALIBRATION, PRUNED, PRUNED + ".partial", STAGE2, FINAL):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    process_group.barrier()

    pruned = (pruned_dir / "config.json").is_file()
    tune_first = cfg.prune.tune_first
    if tune_first and not pruned and not (out_dir / STAGE1 / "adapter" / ADAPTER_CONFIG).is_file():
        log(f"stage 1 of 2: DSEE tuning of A, B, S -> {out_dir / STAGE1}")
        code, finished = finetune.train(cfg1, out_dir / STAGE1, base_model, ctx)
        if not finished:
            return code, False
    if not tune_first:
        log("no stage 1 (prune.tune_first=false): the pretrained weights are pruned, then a fresh adapter tunes")
    adapter = read_adapter(out_dir / STAGE1 / "adapter") if tune_first else None
    if not pruned:
        prune_model(cfg, base_model, adapter, pruned_dir, ctx)
    log_flops(base_model, pruned_dir, cfg.prune.flops_context, dist_info)

    if cfg.prune.method == "structured" and adapter is not None:
        from transformers import AutoConfig

        from dsee_dist.pruning.unstructured import read_report

        adapter = slice_adapter(adapter, read_report(pruned_dir)["plan"], AutoConfig.from_pretrained(base_model))
    log(f"stage 2 of 2: {'re-' if tune_first else ''}tuning A, B, S on the pruned base -> {out_dir / STAGE2}")
    masks_dir = pruned_dir if cfg.prune.method == "unstructured" else None
    code, finished = finetune.train(
        cfg2, out_dir / STAGE2, str(pruned_dir.resolve()), ctx, init_adapter=adapter, masks_dir=masks_dir
    )
    if not finished:
        return code, False
    process_group.on_rank_zero(lambda: export_final(out_dir))
    log(f"final pruned model written to {out_dir / FINAL}")
    return 0, True


def prune_model(cfg: Config, base_model: str, adapter, pruned_dir: Path, ctx: finetune.RunContext) -> None:
    """The stage-1 weights (the pretrained ones where `adapter` is None) pruned into `pruned_dir` (a complete model
    directory, written atomically); an `activation` score first runs calibration examples from the training split
    through that model."""
    log(f"pruning ({cfg.prune.method}) -> {pruned_dir}")
    dist_info = ctx.dist_info
    norms = calibration_norms(cfg, base_model, adapter, ctx) if cfg.prune.calibrates else None
    adapter = adapter if adapter is not None else untuned_adapter(cfg, base_model)
    if cfg.prune.method == "unstructured":
        prune_unstructured(
            cfg.prune, base_model, adapter, pruned_dir, dist_info, seed=cfg.train.seed, log=log, input_norms=norms
        )
    else:
        prune_structured(cfg.prune, base_model, adapter, pruned_dir, dist_info, log=log, input_norms=norms)


def untuned_adapter(cfg: Config, base_model: str) -> tuple[dict, dict]:
    """prune.tune_first=false: a zero update on the modules stage 2 will adapt, so the pretrained weights are what
    is scored, the adaptation groups are those modules, and their keep masks are written for stage 2."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsee_dist.dsee.adapter import zero_adapter
    from dsee_dist.dsee.inject import find_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    d = cfg.dsee
    return zero_adapter(find_targets(model, d.target_modules, d.fused_slices, d.exclude_modules), d)


def calibration_norms(cfg: Config, base_model: str, adapter, ctx: finetune.RunContext) -> dict:
    """Collective: the input norms the activation score needs (of the matrices pruned, or of the output
    projections that heads and neurons write through), from `prune.calibration_examples` training examples,
    through the stage-1 model set up as a training stage is (ZeRO-3 keeps the base partitioned)."""
    import gc

    import torch
    from transformers import AutoConfig

    from dsee_dist.pruning.calibration import input_norms
    from dsee_dist.pruning.structured import calibration_modules
    from dsee_dist.pruning.targets import prunable_matrices

    model_config = AutoConfig.from_pretrained(base_model)
    if cfg.prune.method == "unstructured":
        modules = list(dict.fromkeys(m.module for m in prunable_matrices(model_config, cfg.prune.modules)))
    else:
        modules = calibration_modules(model_config)
    scratch = ctx.out_dir / CALIBRATION  # the support written from the adapter; removed afterwards
    cfg1, _ = tune_and_retune_configs(cfg, ctx.out_dir)
    calibration_cfg = dataclasses.replace(cfg1, output=dataclasses.replace(cfg1.output, dir=str(scratch)), resume=None)
    log(f"calibration: the stage-1 model (base + adapter) set up as for training -> {scratch}")
    trainer = finetune.setup(calibration_cfg, scratch, base_model, ctx, init_adapter=adapter)
    try:
        norms = input_norms(
            trainer.engine.module,
            modules,
            ctx.train_split,
            ctx.tokenizer.pad_token_id,
            ctx.dist_info,
            num_examples=cfg.prune.calibration_examples,
            batch_size=cfg.train.micro_batch_size,
            device=trainer.device,
            lockstep=trainer.engine.zero_optimization_stage() == 3,
        )
    finally:
        trainer.engine.destroy()
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    process_group.barrier()
    if ctx.dist_info.is_rank_zero:
        shutil.rmtree(scratch, ignore_errors=True)
    return norms


def export_final(out_dir: Path) -> None:
    """Rank 0: the merged, pruned model of stage 2's last checkpoint into out_dir/final."""
    from dsee_dist.recipes.export import build_model_from_checkpoint, export_merged

    ckpt = find_resume_checkpoint(out_dir / STAGE2, str(out_dir / STAGE2))
    export_merged(*build_model_from_checkpoint(ckpt), out_dir / FINAL, log=log)


def log_flops(base_model: str, pruned_dir: Path, context: int, dist_info) -> None:
    from transformers import AutoConfig

    from dsee_dist.models.pruned_gpt2 import register

    register()
    dense = flops_per_token(AutoConfig.from_pretrained(base_model), context)
    pruned = flops_per_token(AutoConfig.from_pretrained(str(pruned_dir)), context)
    saved = compare(dense, pruned)
    log(
        f"FLOPs per token (context {context}): dense {dense['total'] / 1e6:.2f} M, "
        f"pruned {pruned['total'] / 1e6:.2f} M; saved {100 * saved['blocks_saved']:.1f}% of the blocks' FLOPs, "
        f"{100 * saved['total_saved']:.1f}% overall"
    )
    if dist_info.is_rank_zero:
        report = format_report("dense", dense) + "\n" + format_report("pruned", pruned) + "\n"
        write_text_atomic(pruned_dir.parent / "flops.txt", report)
