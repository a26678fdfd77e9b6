"""DSEE fine-tuning on the DeepSpeed engine.

    python -m dsee_dist.train --config configs/quickstart.yaml [section.key=value ...]
    deepspeed --num_gpus 2 -m dsee_dist.train --config ... # or torchrun, or srun

Reads top to bottom: config -> distributed init -> base model + tokenizer -> data -> model
(partitioned under ZeRO-3) -> support of S -> DSEE injection -> engine -> loop -> adapter.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dsee_dist.engine import checkpoint
from dsee_dist.data import dataset as data
from dsee_dist.engine import distributed
from dsee_dist.models import loading as models
from dsee_dist.recipes import two_stage
from dsee_dist.dsee.adapter import save_adapter
from dsee_dist.config import Config, dump_yaml, load_config, resolve_path
from dsee_dist.dsee.inject import (check_num_sparse, check_rank, count_parameters, find_targets, inject_dsee,
                          mark_only_adapters_trainable, parameter_summary)
from dsee_dist.dsee.placement import SUPPORT_FILE, load_or_compute_support
from dsee_dist.pruning.stage2 import attach_keep_masks, copy_adapter_values, write_support_from_adapter
from dsee_dist.errors import DSEEError
from dsee_dist.utils.metrics_log import MetricsLogger
from dsee_dist.engine.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler
from dsee_dist.models.tokenizer import train_bpe_tokenizer


# Test aid: seconds to sleep after every step (so a test can signal a job mid-run); 0 in real use.
STEP_DELAY_S = float(os.environ.get("DSEE_DEBUG_STEP_DELAY", "0"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dsee_dist.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. configs/quickstart.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted overrides: train.max_steps=20 ds.zero_optimization.stage=2")
    return parser.parse_args(argv)


def make_logger(is_rank_zero: bool):
    def log(message: str) -> None:
        if is_rank_zero:
            print(f"[dsee] {message}", flush=True)
    return log


def prepare_base_model(cfg: Config, out_dir: Path, log) -> str:
    """Path of the base model directory; for a built-in model, written once into out_dir/base_model."""
    if cfg.model.path is not None:
        path = resolve_path(cfg, cfg.model.path)
        if cfg.model.gguf_file:  # dequantised once into an ordinary directory that everything else reads
            gguf = models.gguf_path(path, cfg.model.gguf_file)
            return distributed.on_rank_zero(lambda: str(models.materialize_gguf_model(gguf, out_dir / "base_model")))
        return str(path) if path.exists() else cfg.model.path

    def build() -> str:
        train_source, _ = data.data_sources(cfg, out_dir)
        texts = data.read_training_texts(cfg, train_source)
        tokenizer = train_bpe_tokenizer(texts, cfg.model.tokenizer_vocab_size)
        path = models.materialize_builtin_model(cfg.model.builtin, tokenizer, cfg.train.seed, out_dir / "base_model")
        log(f"model: built-in {cfg.model.builtin} (random init, seed {cfg.train.seed}), tokenizer of {len(tokenizer)} tokens -> {path}")
        return str(path)

    return distributed.on_rank_zero(build)


def find_resume(cfg: Config, out_dir: Path, log) -> checkpoint.ResumeInfo | None:
    """Rank 0: the checkpoint to continue from (verified), or None for a fresh start."""
    path = checkpoint.find_resume_checkpoint(out_dir, cfg.resume, log=log)
    if path is None:
        if cfg.resume == "auto":
            log("resume: no complete checkpoint in the output directory; starting fresh")
        return None
    info = checkpoint.read_trainer_state(path)
    support = out_dir / SUPPORT_FILE
    if not support.is_file() and (path / SUPPORT_FILE).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path / SUPPORT_FILE, support)
    return info


def save(engine, cfg: Config, out_dir: Path, step: int, dist_info, base_model: str, log) -> None:
    support = out_dir / SUPPORT_FILE
    checkpoint.save_checkpoint(engine, out_dir, step, config=cfg.to_dict(), dist_info=dist_info,
                               keep_last=cfg.checkpoint.keep_last, base_model=base_model,
                               extra_files={SUPPORT_FILE: support} if support.is_file() else {}, log=log)


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


def token_loss_sum(engine, batch: dict, dev) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over the labelled tokens of one micro-batch, and their count."""
    logits = engine(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
    labels = batch["labels"][:, 1:].to(dev)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=data.IGNORE_INDEX,
                           reduction="sum")
    return loss, int((labels != data.IGNORE_INDEX).sum())


def train_step(engine, micro_batches: list[dict], dev, world_size: int) -> float:
    """One optimizer step; returns the mean token loss over the whole global batch.

    The loss is normalised by the global number of labelled tokens (all ranks, all micro-batches), so
    the gradient, and the logged loss, do not depend on how the global batch is split across ranks."""
    local_tokens = sum(int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in micro_batches)
    (global_tokens,) = distributed.all_reduce_sum([local_tokens])
    # DeepSpeed divides each backward by grad_accum and averages gradients over ranks: undo both.
    scale = world_size * len(micro_batches) / max(global_tokens, 1.0)
    loss_total = 0.0
    for batch in micro_batches:
        loss_sum, _ = token_loss_sum(engine, batch, dev)
        engine.backward(loss_sum * scale)
        engine.step()
        loss_total += loss_sum.item()
    (loss_total,) = distributed.all_reduce_sum([loss_total])
    return loss_total / max(global_tokens, 1.0)


@torch.no_grad()
def evaluate(engine, split: data.TokenizedSplit, cfg: Config, dist_info, pad_id: int, dev) -> dict:
    engine.eval()
    loss_sum = tokens = 0.0
    for indices in data.eval_batches(split, cfg.eval.micro_batch_size, dist_info.rank, dist_info.world_size,
                                     cfg.eval.max_batches):
        batch = data.collate(split, indices or [0], pad_id)  # an empty share still joins ZeRO-3's collectives
        loss, n = token_loss_sum(engine, batch, dev)
        if indices:
            loss_sum, tokens = loss_sum + loss.item(), tokens + n
    engine.train()
    loss_sum, tokens = distributed.all_reduce_sum([loss_sum, tokens])
    eval_loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)), "eval_tokens": int(tokens)}


@dataclass
class StageInputs:
    """What a training stage needs beyond its config: the data, and for stage 2 the stage-1 adapter
    (restricted to what pruning kept) and the pruned model's masks."""

    tokenizer: object
    train_split: data.TokenizedSplit
    eval_split: data.TokenizedSplit
    init_adapter: tuple[dict, dict] | None = None
    masks_dir: Path | None = None


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per step.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    dist_info = distributed.init_distributed(cfg.deepspeed.timeout_s)
    log = make_logger(dist_info.is_rank_zero)
    out_dir = Path(cfg.output.dir)
    if dist_info.is_rank_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.resolved.yaml").write_text(dump_yaml(cfg))
    distributed.barrier()
    torch.manual_seed(cfg.train.seed)
    log(f"world size {dist_info.world_size}; output in {out_dir}")

    # Data first: a built-in model's tokenizer is trained on it.
    if cfg.data.format == "synthetic_e2e":
        distributed.on_rank_zero(lambda: data.materialize_synthetic_data(cfg, out_dir))
    base_model = prepare_base_model(cfg, out_dir, log)
    base_model = str(Path(base_model).resolve()) if Path(base_model).exists() else base_model
    tokenizer = models.load_tokenizer(base_model)
    train_split, eval_split = data.load_splits(cfg, tokenizer, out_dir, log)
    log(f"data: {len(train_split)} training / {len(eval_split)} evaluation examples")
    inputs = StageInputs(tokenizer, train_split, eval_split)

    if cfg.prune.method == "none":
        code, finished = train_stage(cfg, out_dir, base_model, inputs, dist_info, log)
    else:
        code, finished = two_stage.run(cfg, out_dir, base_model, inputs, dist_info, log, train_stage)
    distributed.shutdown()
    return code


def train_stage(cfg: Config, out_dir: Path, base_model: str, inputs: StageInputs, dist_info, log) -> tuple[int, bool]:
    """One DSEE training run into `out_dir` (checkpoints, metrics, adapter). Returns (exit status, whether
    it reached its last step)."""
    train_split, eval_split = inputs.train_split, inputs.eval_split
    if dist_info.is_rank_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    # Resume is decided before the support, so a resumed job uses the support saved with its checkpoint.
    resume = distributed.on_rank_zero(lambda: find_resume(cfg, out_dir, log))
    if resume is not None:
        checkpoint.check_compatible(resume, cfg.to_dict(), dist_info.world_size)

    # Model: partitioned at creation under ZeRO-3.
    ds_config = distributed.build_deepspeed_config(
        distributed.resolve_deepspeed_json(resolve_path(cfg, cfg.deepspeed.config)), cfg.deepspeed.overrides,
        micro_batch_size=cfg.train.micro_batch_size, grad_accum_steps=cfg.train.grad_accum_steps,
        grad_clip=cfg.train.grad_clip, world_size=dist_info.world_size)
    model = models.load_model(base_model, ds_config, dropout=cfg.model.dropout)
    log(f"model: {base_model} ({next(model.parameters()).dtype}, ZeRO stage {distributed.zero_stage(ds_config)})")

    # DSEE: pick the support of S from the frozen weights (or take the stage-1 adapter's), then wrap the
    # targets and freeze the rest.
    d = cfg.dsee
    specs = find_targets(model, d.target_modules, d.fused_slices, d.exclude_modules)
    check_rank(specs, d.lora_rank)
    if inputs.init_adapter is not None:
        distributed.on_rank_zero(lambda: write_support_from_adapter(inputs.init_adapter, specs, d, cfg.train.seed, out_dir))
    else:
        check_num_sparse(specs, d.num_sparse)
    support = load_or_compute_support(model, specs, d, cfg.train.seed, out_dir, dist_info, log=log)
    inject_dsee(model, specs, support, rank=d.lora_rank, alpha=d.lora_alpha, dropout=d.lora_dropout, seed=cfg.train.seed)
    if inputs.init_adapter is not None:
        copy_adapter_values(model, inputs.init_adapter[1])
    trainable = mark_only_adapters_trainable(model)
    if inputs.masks_dir is not None:
        n_masked, n_partitioned = attach_keep_masks(model, inputs.masks_dir, ds_config)
        log(f"prune: masks on the update of {n_masked} adapted modules (pruned entries stay zero), "
            f"{n_partitioned} of them partitioned across ranks")
    log(parameter_summary(model))

    # Engine: only the adapter parameters reach the optimizer.
    schedule = data.GlobalBatchSchedule(len(train_split), cfg.train.micro_batch_size, cfg.train.grad_accum_steps,
                                        dist_info.rank, dist_info.world_size, cfg.train.seed)
    max_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * schedule.steps_per_epoch)
    optimizer = distributed.build_optimizer([{"params": trainable}], ds_config, cfg.train.lr, cfg.train.adam_betas,
                                            cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.schedule, cfg.train.warmup_steps, max_steps))
    engine, optimizer, scheduler = distributed.build_engine(model, optimizer, scheduler, ds_config)
    dev = distributed.device()
    pad_id = inputs.tokenizer.pad_token_id
    start_step = 0
    if resume is not None:
        resharded = checkpoint.load_checkpoint(engine, resume, dist_info)
        start_step = resume.step
        if dist_info.is_rank_zero:
            checkpoint.truncate_metrics(out_dir, start_step)
        log(f"resume: continuing from step {start_step} of {resume.path}"
            + (f" (written at world size {resume.world_size}, ZeRO stage {resume.zero_stage}; resharded)" if resharded else ""))
    log(f"training {max_steps} steps of {schedule.global_batch} examples "
        f"({cfg.train.micro_batch_size} x {cfg.train.grad_accum_steps} accum x {dist_info.world_size} ranks)")

    metrics = MetricsLogger(out_dir, dist_info.is_rank_zero, max_steps, start_step)
    preemption = PreemptionHandler(log)
    engine.train()  # from_pretrained returns the model in eval mode
    t_last = time.time()
    for step in range(start_step, max_steps):
        lr = optimizer.param_groups[0]["lr"]
        batches = [data.collate(train_split, idx, pad_id) for idx in schedule.micro_batches(step)]
        loss = train_step(engine, batches, dev, dist_info.world_size)
        metrics.advance(loss)
        if STEP_DELAY_S:
            time.sleep(STEP_DELAY_S)
        if step == start_step:
            (state_total,) = distributed.all_reduce_sum([distributed.optimizer_state_numel(engine)])
            log(f"optimizer state: {int(state_total):,} Adam moment values over {dist_info.world_size} ranks "
                f"for {count_parameters(model)[0]:,} trainable parameters")
            metrics.log(step + 1, {"optimizer_state_numel": int(state_total)})
        if (step + 1) % cfg.train.log_every_n_steps == 0 or step + 1 == max_steps:
            grad_norm = engine.get_global_grad_norm()
            now = time.time()
            metrics.log(step + 1, {"loss": loss, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                   "step_time_s": round((now - t_last) / cfg.train.log_every_n_steps, 4)})
            t_last = now
        if cfg.eval.every_n_steps and (step + 1) % cfg.eval.every_n_steps == 0 and step + 1 < max_steps:
            result = evaluate(engine, eval_split, cfg, dist_info, pad_id, dev)
            metrics.log(step + 1, result)
            log(f"step {step + 1}: eval loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f}")
        stop = preemption.should_stop()
        planned_stop = cfg.train.stop_after_steps > 0 and step + 1 - start_step >= cfg.train.stop_after_steps
        every = cfg.checkpoint.every
        if stop or planned_stop or step + 1 == max_steps or (every and (step + 1) % every == 0):
            save(engine, cfg, out_dir, step + 1, dist_info, base_model, log)
        if stop or (planned_stop and step + 1 < max_steps):
            if stop:
                preemption.ignore_further_signals()
                log(f"preempted ({preemption.signal_name or 'signal on another rank'}): checkpoint of step {step + 1} "
                    f"saved; exiting with status {PREEMPTED_EXIT_CODE} so a requeued job resumes with resume=auto")
            else:
                log(f"stopping after {cfg.train.stop_after_steps} steps of this job (train.stop_after_steps); "
                    f"resume=auto continues from step {step + 1}")
            metrics.close()
            return (PREEMPTED_EXIT_CODE if stop else 0), False
    preemption.restore()
    result = evaluate(engine, eval_split, cfg, dist_info, pad_id, dev)
    metrics.log(max_steps, result)
    metrics.close()
    log(f"final eval loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f}")

    save_adapter(engine.module, out_dir / "adapter", base_model=base_model, dsee_cfg=cfg.dsee,
                 is_rank_zero=dist_info.is_rank_zero)
    distributed.barrier()
    log(f"adapter written to {out_dir / 'adapter'}")
    return 0, True


def run(argv: list[str] | None = None) -> int:
    """`main` with user errors turned into one line on stderr and exit status 2."""
    try:
        return main(argv)
    except DSEEError as exc:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        if rank == 0:  # every rank fails the same way; one line is enough
            print(f"dsee_dist: error: {exc}", file=sys.stderr, flush=True)
        distributed.shutdown()
        return exc.exit_code
    except RuntimeError as exc:
        if not distributed.is_lost_peer(exc):
            raise
        # A node or rank went away mid-collective: one line per surviving rank, no teardown (it would wait
        # for the lost peer again); the launcher stops the other ranks.
        print(f"dsee_dist: error: rank {os.environ.get('RANK', '?')} lost contact with the other ranks "
              f"({str(exc).splitlines()[0][:160]}): a node failed or the network between nodes is down; "
              f"resubmit the same job (resume=auto) to continue from the last complete checkpoint",
              file=sys.stderr, flush=True)
        return distributed.LOST_PEER_EXIT_CODE


def exit_process(code: int) -> None:
    """End the process without interpreter teardown. gloo's background threads can abort a process at
    exit ("terminate called without an active exception", status 250) after a fully successful run, even
    after destroy_process_group; the launcher would then report a finished job as failed. By now every
    file is written and closed, so only the streams need flushing."""
    status_file = os.environ.get("DSEE_EXIT_STATUS_FILE")
    if status_file and os.environ.get("RANK", "0") == "0":
        # For batch scripts: the launcher between them and the ranks may report another status (e.g. srun
        # after --kill-on-bad-exit stopped the other nodes), so rank 0 states its own, e.g. 75 = requeue me.
        Path(status_file).write_text(f"{code}\n")
    mpi = sys.modules.get("mpi4py.MPI")  # started by mpirun: MPI wants MPI_Finalize before any exit
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(run())
