"""DSEE fine-tuning on the DeepSpeed engine (started by recipes/run.py: `python -m dsee_dist.train`).

The path of a run, top to bottom:

    setup_run             process group, output dir, data, base model, tokenizer (shared by stages)
         -> train         one stage into one output directory:
              setup       resume decision, model (partitioned under ZeRO-3), support of S, DSEE injection, engine
              fit         the loop: train_step, log, periodic evaluate_loss, checkpoint / preemption stop
              evaluate_loss  loss and perplexity on the evaluation set
              save        the adapter
    (prune.method != none: recipes/run.py hands the run to recipes/two_stage.py, which runs `train` per stage)
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dsee_dist.config import Config, dump_yaml, resolve_path
from dsee_dist.data import dataset as data
from dsee_dist.dsee.inject import (
    check_num_sparse,
    check_rank,
    count_parameters,
    find_targets,
    inject_dsee,
    mark_only_adapters_trainable,
    parameter_summary,
)
from dsee_dist.dsee.placement import SUPPORT_FILE, load_or_compute_support
from dsee_dist.engine import checkpoint, deepspeed_engine, process_group
from dsee_dist.engine.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler
from dsee_dist.errors import DSEEError
from dsee_dist.eval import throughput
from dsee_dist.eval.during_training import Decoder, GenerationEval
from dsee_dist.models import loading as models
from dsee_dist.models.tokenizer import train_bpe_tokenizer
from dsee_dist.pruning.stage2 import attach_keep_masks, copy_adapter_values, write_support_from_adapter
from dsee_dist.recipes import evaluate, methods
from dsee_dist.recipes.loss import token_loss_sum as lm_loss_sum
from dsee_dist.utils.log import setup_logging
from dsee_dist.utils.metrics_log import MetricsLogger

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ the run


@dataclass
class RunContext:
    """What every stage of a run shares: the process group, the base model and the tokenized data."""

    dist_info: process_group.DistInfo
    out_dir: Path
    base_model: str
    tokenizer: object
    train_split: data.TokenizedSplit
    eval_split: data.TokenizedSplit
    # installed before anything else: a preemption signal during the set-up (data, model, support) is not lost
    preemption: PreemptionHandler


def setup_run(cfg: Config, preemption: PreemptionHandler) -> RunContext:
    """Process group, output directory with the resolved config, seed, data, base model and tokenizer."""
    dist_info = process_group.init_distributed(cfg.deepspeed.timeout_s)
    setup_logging(dist_info.rank)
    out_dir = Path(cfg.output.dir)
    torch.manual_seed(cfg.train.seed)
    threads = f"; {torch.get_num_threads()} CPU threads per rank" if process_group.device().type == "cpu" else ""
    logger.info(f"world size {dist_info.world_size}{threads}; output in {out_dir}")

    # transformers' model code takes seconds to import; every rank imports it now, side by side, rather than
    # rank 0 while writing a built-in or GGUF model below and the others only after it, one after the other.
    models.import_model_code()
    # Nothing is written into a new output directory until the data is known to be good: a data error leaves
    # no half-made run behind (an existing directory, a resumed run's, is left as it was).
    created = not out_dir.exists()
    try:
        # Data first: a built-in model's tokenizer is trained on it.
        if cfg.data.format == "synthetic_e2e":
            process_group.on_rank_zero(lambda: data.materialize_synthetic_data(cfg, out_dir))
        base_model = prepare_base_model(cfg, out_dir)
        base_model = str(Path(base_model).resolve()) if Path(base_model).exists() else base_model
        tokenizer = models.load_tokenizer(base_model)
        if cfg.data.packing:
            check_packing_supported(base_model)
        train_split, eval_split = data.load_splits(cfg, tokenizer, out_dir)
    except DSEEError:  # raised on every rank alike (the data and model steps share their failures)
        if created and dist_info.is_rank_zero:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if dist_info.is_rank_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.resolved.yaml").write_text(dump_yaml(cfg))
    process_group.barrier()
    logger.info(f"data: {len(train_split)} training / {len(eval_split)} evaluation examples")
    return RunContext(dist_info, out_dir, base_model, tokenizer, train_split, eval_split, preemption)


def check_packing_supported(base_model: str) -> None:
    """data.packing needs a family whose attention keeps packed examples apart (models/families.py)."""
    from transformers import AutoConfig

    from dsee_dist.models.families import family_of

    family = family_of(AutoConfig.from_pretrained(base_model), required=False)
    if family is not None and not family.packing:
        raise DSEEError(
            f"data.packing is not supported for {family.name} models (its attention would cross packed examples); "
            "leave data.packing false (data.group_by_length also cuts padding)"
        )


def prepare_base_model(cfg: Config, out_dir: Path) -> str:
    """Path of the base model directory; for a built-in model, written once into out_dir/base_model."""
    if cfg.model.path is not None:
        path = resolve_path(cfg, cfg.model.path)
        if cfg.model.gguf_file:  # dequantised once into an ordinary directory that everything else reads
            gguf = models.gguf_path(path, cfg.model.gguf_file)
            return process_group.on_rank_zero(lambda: str(models.materialize_gguf_model(gguf, out_dir / "base_model")))
        return str(path) if path.exists() else cfg.model.path

    def build() -> str:
        train_source, _ = data.data_sources(cfg, out_dir)
        texts = data.read_training_texts(cfg, train_source, out_dir / "cache" / "raw")
        tokenizer = train_bpe_tokenizer(texts, cfg.model.tokenizer_vocab_size)
        path = models.materialize_builtin_model(cfg.model.builtin, tokenizer, cfg.train.seed, out_dir / "base_model")
        logger.info(
            f"model: built-in {cfg.model.builtin} (random init, seed {cfg.train.seed}), "
            f"tokenizer of {len(tokenizer)} tokens -> {path}"
        )
        return str(path)

    return process_group.on_rank_zero(build)


def train(
    cfg: Config,
    out_dir: Path,
    base_model: str,
    ctx: RunContext,
    *,
    init_adapter: tuple[dict, dict] | None = None,
    masks_dir: Path | None = None,
) -> tuple[int, bool]:
    """One DSEE training stage into `out_dir` (checkpoints, metrics, adapter): setup -> fit -> evaluate_loss -> save.
    Returns (exit status, whether it reached its last step). Stage 2 of the two-stage recipe passes the
    stage-1 adapter (restricted to what pruning kept) and, after unstructured pruning, the masks."""
    trainer = setup(cfg, out_dir, base_model, ctx, init_adapter=init_adapter, masks_dir=masks_dir)
    stopped = fit(trainer)
    if stopped is not None:
        return stopped, False
    result = evaluate_loss(trainer)
    trainer.metrics.log(trainer.max_steps, result)
    trainer.metrics.close()
    logger.info(f"final eval loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f}")
    save(trainer)
    return 0, True


# ------------------------------------------------------------------------------ setup


@dataclass
class Trainer:
    """The state of one training stage's trainer: the model, its DeepSpeed engine and optimizer, the batch
    schedule and the step counts; everything the loop, the evaluation and the save use."""

    cfg: Config
    out_dir: Path
    base_model: str
    ctx: RunContext
    model: torch.nn.Module
    engine: object
    optimizer: torch.optim.Optimizer
    schedule: data.GlobalBatchSchedule
    max_steps: int
    start_step: int
    device: torch.device
    pad_id: int
    metrics: MetricsLogger | None = None
    # Since the last logged step (for tokens/s and MFU): labelled tokens and processed positions of all ranks.
    tokens_trained: float = 0.0
    tokens_processed: int = 0
    sequences: int = 0
    tokens_real: int = 0  # processed positions that are not padding
    label_counts: list[int] | None = None  # per training example, for the global token count of a step
    prefetched: tuple[int, list[dict]] | None = None  # (step, its micro-batches), collated during the step before
    grad_norm: torch.Tensor | None = None  # of the last logged step, where DeepSpeed keeps none (fp32 ZeRO-0)


def setup(
    cfg: Config, out_dir: Path, base_model: str, ctx: RunContext, *, init_adapter=None, masks_dir: Path | None = None
) -> Trainer:
    """Resume decision -> DeepSpeed config -> model -> DSEE -> optimizer and engine -> restored state."""
    resume = decide_resume(cfg, out_dir, ctx.dist_info)
    ds_config = deepspeed_engine.deepspeed_config_of(cfg, ctx.dist_info.world_size)
    model, trainable = build_trainable_model(cfg, out_dir, base_model, ds_config, ctx, init_adapter, masks_dir)
    schedule = batch_schedule(cfg, ctx)
    max_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * schedule.steps_per_epoch)
    engine, optimizer = build_training_engine(cfg, model, trainable, ds_config, max_steps)
    start_step = restore(engine, resume, out_dir, ctx.dist_info)
    return Trainer(
        cfg,
        out_dir,
        base_model,
        ctx,
        model,
        engine,
        optimizer,
        schedule,
        max_steps,
        start_step,
        process_group.device(),
        ctx.tokenizer.pad_token_id,
    )


def decide_resume(cfg: Config, out_dir: Path, dist_info) -> checkpoint.ResumeInfo | None:
    """The checkpoint this stage continues from (checked against the config and world size), or None. Decided
    before the support, so a resumed job uses the support saved with its checkpoint."""
    if dist_info.is_rank_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
    process_group.barrier()
    resume = process_group.on_rank_zero(lambda: find_resume(cfg, out_dir))
    if resume is not None:
        checkpoint.check_compatible(resume, cfg.to_dict(), dist_info.world_size)
    return resume


def build_trainable_model(
    cfg: Config, out_dir: Path, base_model: str, ds_config: dict, ctx: RunContext, init_adapter, masks_dir
) -> tuple[torch.nn.Module, list]:
    """The model (partitioned at creation under ZeRO-3) with what `method` trains made trainable, and those
    parameters."""
    model = models.load_model(base_model, ds_config, dropout=cfg.model.dropout)
    logger.info(
        f"model: {base_model} ({next(model.parameters()).dtype}, ZeRO stage {deepspeed_engine.zero_stage(ds_config)})"
    )
    if cfg.method == "dsee":
        trainable = inject_adapters(model, cfg, out_dir, ds_config, ctx.dist_info, init_adapter, masks_dir)
    else:  # PEFT LoRA or full fine-tuning: the same loop on another trainable model (recipes/methods.py)
        model, trainable = methods.prepare_trainable(cfg, model)
    logger.info(parameter_summary(model))
    if cfg.train.activation_checkpointing:  # non-reentrant: works with a frozen base and ZeRO-3's hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, trainable


def batch_schedule(cfg: Config, ctx: RunContext) -> data.GlobalBatchSchedule:
    """Which training examples every step and micro-batch of this rank takes."""
    return data.GlobalBatchSchedule(
        len(ctx.train_split),
        cfg.train.micro_batch_size,
        cfg.train.grad_accum_steps,
        ctx.dist_info.rank,
        ctx.dist_info.world_size,
        cfg.train.seed,
        lengths=ctx.train_split.lengths() if cfg.data.group_by_length else None,
    )


def build_training_engine(cfg: Config, model, trainable: list, ds_config: dict, max_steps: int):
    """(DeepSpeed engine, its optimizer): only the trainable parameters reach the optimizer; the learning rate
    follows train.schedule over `max_steps`."""
    optimizer = deepspeed_engine.build_optimizer(
        [{"params": trainable}], ds_config, cfg.train.lr, cfg.train.adam_betas, cfg.train.weight_decay
    )
    lr_schedule = lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule)
    engine, optimizer, _ = deepspeed_engine.build_engine(model, optimizer, scheduler, ds_config)
    return engine, optimizer


def restore(engine, resume: checkpoint.ResumeInfo | None, out_dir: Path, dist_info) -> int:
    """The step training starts from: 0, or the resumed checkpoint's (its state loaded into `engine`, the
    metrics log cut back to it)."""
    if resume is None:
        return 0
    resharded = checkpoint.load_checkpoint(engine, resume, dist_info)
    if dist_info.is_rank_zero:
        checkpoint.truncate_metrics(out_dir, resume.step)
    logger.info(
        f"resume: continuing from step {resume.step} of {resume.path}"
        + (
            f" (written at world size {resume.world_size}, ZeRO stage {resume.zero_stage}; resharded)"
            if resharded
            else ""
        )
    )
    return resume.step


def find_resume(cfg: Config, out_dir: Path) -> checkpoint.ResumeInfo | None:
    """Rank 0: the checkpoint to continue from (verified), or None for a fresh start."""
    path = checkpoint.find_resume_checkpoint(out_dir, cfg.resume)
    if path is None:
        if cfg.resume == "auto":
            logger.info("resume: no complete checkpoint in the output directory; starting fresh")
        return None
    info = checkpoint.read_trainer_state(path)
    support = out_dir / SUPPORT_FILE
    if not support.is_file() and (path / SUPPORT_FILE).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path / SUPPORT_FILE, support)
    return info


def inject_adapters(
    model, cfg: Config, out_dir: Path, ds_config: dict, dist_info, init_adapter=None, masks_dir: Path | None = None
) -> list[torch.nn.Parameter]:
    """Pick the support of S from the frozen weights (or take the stage-1 adapter's), wrap the targets in
    DSEE layers, freeze the rest; returns the trainable parameters."""
    d = cfg.dsee
    specs = find_targets(model, d.target_modules, d.fused_slices, d.exclude_modules)
    check_rank(specs, d.lora_rank)
    if init_adapter is not None:
        process_group.on_rank_zero(lambda: write_support_from_adapter(init_adapter, specs, d, cfg.train.seed, out_dir))
    else:
        check_num_sparse(specs, d.num_sparse)
    support = load_or_compute_support(model, specs, d, cfg.train.seed, out_dir, dist_info)
    inject_dsee(
        model, specs, support, rank=d.lora_rank, alpha=d.lora_alpha, dropout=d.lora_dropout, seed=cfg.train.seed
    )
    if init_adapter is not None:
        copy_adapter_values(model, init_adapter[1])
    trainable = mark_only_adapters_trainable(model)
    if masks_dir is not None:
        n_masked, n_partitioned = attach_keep_masks(model, masks_dir, ds_config)
        logger.info(
            f"prune: masks on the update of {n_masked} adapted modules (pruned entries stay zero), "
            f"{n_partitioned} of them partitioned across ranks"
        )
    return trainable


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ------------------------------------------------------------------------------ fit


def fit(trainer: Trainer) -> int | None:
    """The training loop from `trainer.start_step`. Returns None after the last step, or the exit status when
    the stage stopped early with a checkpoint (preemption, train.stop_after_steps)."""
    cfg, dist_info = trainer.cfg, trainer.ctx.dist_info
    logger.info(
        f"training {trainer.max_steps} steps of {trainer.schedule.global_batch} examples "
        f"({cfg.train.micro_batch_size} x {cfg.train.grad_accum_steps} accum x {dist_info.world_size} ranks)"
    )
    trainer.metrics = MetricsLogger(trainer.out_dir, dist_info.is_rank_zero, trainer.max_steps, trainer.start_step)
    preemption = trainer.ctx.preemption
    if preemption.should_stop():  # signalled during the set-up: nothing new to save, the requeued job resumes
        return stop_early(trainer, trainer.start_step, preemption, saved=False)
    generation = generation_eval(trainer)  # eval.generate_every_n_steps, checkpoint.keep_best, final_generate
    trainer.engine.train()  # from_pretrained returns the model in eval mode
    t_last = time.time()
    for step in range(trainer.start_step, trainer.max_steps):
        lr = trainer.optimizer.param_groups[0]["lr"]
        done = step + 1
        logged = done % cfg.train.log_every_n_steps == 0 or done == trainer.max_steps
        loss_share = train_step(trainer, step, logged=logged)
        # Reduced (a collective and a host sync) only on logged steps; the progress bar keeps the last value.
        loss = float(process_group.all_reduce_tensor(loss_share)) if logged else None
        trainer.metrics.advance(loss)
        if step == trainer.start_step:
            log_optimizer_state(trainer, done)
        if logged:
            t_last = log_progress(trainer, done, loss, lr, t_last)
        if cfg.eval.every_n_steps and done % cfg.eval.every_n_steps == 0 and done < trainer.max_steps:
            periodic_evaluate_loss(trainer, done)
        new_best = generation.after_step(done)
        preempted = preemption.should_stop()
        planned_stop = cfg.train.stop_after_steps > 0 and done - trainer.start_step >= cfg.train.stop_after_steps
        every = cfg.checkpoint.every
        if preempted or planned_stop or new_best or done == trainer.max_steps or (every and done % every == 0):
            save_checkpoint(trainer, done)
        if preempted or (planned_stop and done < trainer.max_steps):
            return stop_early(trainer, done, preemption if preempted else None)
    generation.finish()
    return None


def generation_eval(trainer: Trainer) -> GenerationEval:
    """Generation metrics during training (eval/during_training.py) on this stage's model."""
    decoder = Decoder(
        trainer.engine.module,
        trainer.ctx.tokenizer,
        trainer.ctx.dist_info,
        trainer.device,
        synced_gpus=trainer.engine.zero_optimization_stage() == 3,
        resume_training=trainer.engine.train,
    )
    return GenerationEval(
        trainer.cfg,
        decoder,
        run_dir=trainer.ctx.out_dir,
        out_dir=trainer.out_dir,
        start_step=trainer.start_step,
        log_metrics=trainer.metrics.log,
        score_final=evaluate.write_scores,
    )


def train_step(trainer: Trainer, step: int, *, logged: bool = False) -> float:
    """One optimizer step on this rank's share of global batch `step`; returns this rank's share of the mean
    token loss over the whole global batch, as a device tensor (summed over ranks it is the mean; no host sync).
    On a `logged` step the gradient norm is kept in `trainer.grad_norm` where DeepSpeed measures none.

    The loss is normalised by the global number of labelled tokens (all ranks, all micro-batches), so
    the gradient, and the logged loss, do not depend on how the global batch is split across ranks."""
    engine, split = trainer.engine, trainer.ctx.train_split
    micro_batches = step_batches(trainer, step)
    # Labelled tokens of the whole global batch, from the host copy of the data: no collective, no device sync.
    if trainer.label_counts is None:
        trainer.label_counts = split.shifted_label_counts()
    global_tokens = float(sum(trainer.label_counts[i] for i in trainer.schedule.global_indices(step)))
    world_size = trainer.ctx.dist_info.world_size  # padded lengths differ per rank: this rank's share x ranks
    trainer.tokens_trained += global_tokens
    trainer.tokens_processed += world_size * sum(b["input_ids"].numel() for b in micro_batches)
    trainer.sequences += world_size * sum(len(b["input_ids"]) for b in micro_batches)
    trainer.tokens_real += world_size * sum(int(b["attention_mask"].sum()) for b in micro_batches)
    # DeepSpeed divides each backward by grad_accum and averages gradients over ranks: undo both.
    scale = trainer.ctx.dist_info.world_size * len(micro_batches) / max(global_tokens, 1.0)
    loss_total = torch.zeros((), dtype=torch.float64, device=trainer.device)
    own_grad_norm = logged and not deepspeed_engine.reports_grad_norm(engine)
    for batch in micro_batches:
        loss_sum, _ = token_loss_sum(engine, batch, trainer.device, trainer.cfg.train.loss_chunk_tokens)
        engine.backward(loss_sum * scale)
        if own_grad_norm and engine.is_gradient_accumulation_boundary():  # averaged over ranks, not yet clipped
            trainer.grad_norm = deepspeed_engine.trainable_grad_norm(engine.module)
        engine.step()
        loss_total += loss_sum.detach().double()
    if step + 1 < trainer.max_steps:  # the device is still busy with this step's kernels: collate the next one
        trainer.prefetched = (step + 1, collate_step(trainer, step + 1))
    return loss_total / max(global_tokens, 1.0)  # this rank's share of the mean loss, left on the device


def step_batches(trainer: Trainer, step: int) -> list[dict]:
    """This rank's micro-batches of global batch `step`: the ones prefetched during the previous step, if any."""
    ready, trainer.prefetched = trainer.prefetched, None
    return ready[1] if ready is not None and ready[0] == step else collate_step(trainer, step)


def collate_step(trainer: Trainer, step: int) -> list[dict]:
    """Host tensors; in pinned memory on CUDA, so the loss's non-blocking copies overlap with compute."""
    pin = trainer.device.type == "cuda"
    split = trainer.ctx.train_split
    return [data.collate(split, idx, trainer.pad_id, pin_memory=pin) for idx in trainer.schedule.micro_batches(step)]


def token_loss_sum(engine, batch: dict, dev, chunk_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over the labelled tokens of one micro-batch (recipes/loss.py; chunked
    with train.loss_chunk_tokens), and their count (from the host copy of the labels: no device sync)."""
    loss_sum, _ = lm_loss_sum(engine, batch, dev, chunk_tokens=max(chunk_tokens, 0))
    return loss_sum, int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())


def log_optimizer_state(trainer: Trainer, done: int) -> None:
    """Once per job: what the optimizer really holds, summed over ranks."""
    world_size = trainer.ctx.dist_info.world_size
    (state_total,) = process_group.all_reduce_sum([deepspeed_engine.optimizer_state_numel(trainer.engine)])
    logger.info(
        f"optimizer state: {int(state_total):,} Adam moment values over {world_size} ranks "
        f"for {count_parameters(trainer.model)[0]:,} trainable parameters"
    )
    trainer.metrics.log(done, {"optimizer_state_numel": int(state_total)})


def log_progress(trainer: Trainer, done: int, loss: float, lr: float, t_last: float) -> float:
    grad_norm = trainer.engine.get_global_grad_norm() if trainer.grad_norm is None else trainer.grad_norm
    trainer.grad_norm = None
    now = time.time()
    speed = throughput.interval_metrics(
        trainer.engine.module.config,
        trainer.cfg.method,
        tokens_trained=trainer.tokens_trained,
        tokens_processed=trainer.tokens_processed,
        sequences=trainer.sequences,
        elapsed_s=now - t_last,
        world_size=trainer.ctx.dist_info.world_size,
    )
    trainer.metrics.log(
        done,
        {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "step_time_s": round((now - t_last) / trainer.cfg.train.log_every_n_steps, 4),
            **speed,
            "padding_fraction": round(1.0 - trainer.tokens_real / max(trainer.tokens_processed, 1), 4),
        },
    )
    mfu = "n/a" if speed["mfu"] is None else f"{speed['mfu']:.1%}"
    trainer.metrics.show(tok_s=f"{speed['tokens_per_s']:.0f}", mfu=mfu)
    trainer.tokens_trained, trainer.tokens_processed, trainer.sequences, trainer.tokens_real = 0.0, 0, 0, 0
    return now


def periodic_evaluate_loss(trainer: Trainer, done: int) -> None:
    """Evaluation every eval.every_n_steps during training (the final one is in `train`)."""
    result = evaluate_loss(trainer)
    trainer.metrics.log(done, result)
    logger.info(f"step {done}: eval loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f}")


def save_checkpoint(trainer: Trainer, done: int) -> None:
    """A sharded checkpoint of step `done` (all ranks), with the support of S beside it."""
    support = trainer.out_dir / SUPPORT_FILE
    checkpoint.save_checkpoint(
        trainer.engine,
        trainer.out_dir,
        done,
        config=trainer.cfg.to_dict(),
        dist_info=trainer.ctx.dist_info,
        keep_last=trainer.cfg.checkpoint.keep_last,
        base_model=trainer.base_model,
        extra_files={SUPPORT_FILE: support} if support.is_file() else {},
    )


def stop_early(trainer: Trainer, done: int, preemption: PreemptionHandler | None, saved: bool = True) -> int:
    """After the checkpoint of an early stop (`saved`; a preemption before the first step has nothing to
    save): say how the run continues; returns the exit status."""
    if preemption is not None:
        preemption.ignore_further_signals()
        state = f"checkpoint of step {done} saved" if saved else f"before training step {done + 1}, nothing to save"
        logger.info(
            f"preempted ({preemption.signal_name or 'signal on another rank'}): {state}; "
            f"exiting with status {PREEMPTED_EXIT_CODE} so a requeued job resumes with resume=auto"
        )
    else:
        logger.info(
            f"stopping after {trainer.cfg.train.stop_after_steps} steps of this job (train.stop_after_steps); "
            f"resume=auto continues from step {done}"
        )
    trainer.metrics.close()
    return PREEMPTED_EXIT_CODE if preemption is not None else 0


# ------------------------------------------------------------------------------ evaluate_loss, save


@torch.no_grad()
def evaluate_loss(trainer: Trainer) -> dict:
    """Mean token loss and perplexity on the evaluation set (every rank takes part)."""
    cfg, dist_info, engine, split = trainer.cfg, trainer.ctx.dist_info, trainer.engine, trainer.ctx.eval_split
    engine.eval()
    loss_sum = tokens = 0.0
    for indices in data.eval_batches(
        split, cfg.eval.micro_batch_size, dist_info.rank, dist_info.world_size, cfg.eval.max_batches
    ):
        batch = data.collate(split, indices or [0], trainer.pad_id)  # an empty share still joins ZeRO-3's collectives
        loss, n = token_loss_sum(engine, batch, trainer.device)
        if indices:
            loss_sum, tokens = loss_sum + loss.item(), tokens + n
    engine.train()
    loss_sum, tokens = process_group.all_reduce_sum([loss_sum, tokens])
    eval_loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)), "eval_tokens": int(tokens)}


def save(trainer: Trainer) -> None:
    """The training result into out_dir (rank 0 writes, every rank gathers): the DSEE adapter in adapter/, or
    for method lora a PEFT adapter in adapter/, for full the whole model in merged/ (recipes/methods.py)."""
    dist_info = trainer.ctx.dist_info
    target = methods.save_trained(
        trainer.cfg.method,
        trainer.engine.module,
        trainer.out_dir,
        base_model=trainer.base_model,
        dsee_cfg=trainer.cfg.dsee,
        is_rank_zero=dist_info.is_rank_zero,
    )
    process_group.barrier()
    logger.info(f"{'adapter' if trainer.cfg.method != 'full' else 'model'} written to {target}")
