"""Generation metrics inside training (called from the loop of `recipes/finetune.py`).

- `eval.generate_every_n_steps`: greedy-decode the first `eval.generate_max_examples` MRs of the evaluation
  set and log `eval_bleu` and `eval_rouge_l` to metrics.jsonl and TensorBoard.
- `checkpoint.keep_best: bleu | rouge_l`: a new best saves a checkpoint of that step (if the step has none
  anyway), records it in `checkpoints/best.json`, and `checkpoint.keep_last` never removes it.
- `eval.final_generate`: after the last step, decode every MR of the evaluation set with the `generate:`
  settings; `generations.txt` and `generations.scores.json` (the five E2E figures) go to the output dir.

Decoding uses the training engine's own module. Under ZeRO-3 it stays partitioned: every rank calls
`generate` in lockstep with `synced_gpus=True` and DeepSpeed gathers the parameters of one layer at a time
inside each forward, so no rank ever holds the whole model. Below ZeRO-3 every rank holds the whole model
and decodes its share of the batches. Scores are computed on rank 0 and shared with every rank.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dsee_dist.engine.checkpoint import BEST as BEST_FILE  # in checkpoints/: {"metric", "value", "step", "tag"}
from dsee_dist.errors import ConfigError
from dsee_dist.eval.decoding import DecodingSettings, generate_texts
from dsee_dist.eval.references import References, read_references

logger = logging.getLogger(__name__)

GENERATIONS = "generations.txt"
METRIC_KEYS = {"bleu": "BLEU", "rouge_l": "ROUGE_L"}


def check_generation_config(cfg) -> None:
    """The decoding settings as DecodingSettings accepts them (the config's own validation has checked the
    combinations generation during training needs when the config was loaded)."""
    DecodingSettings.from_config(cfg.generate)


def best_checkpoint_tag(checkpoint_root: Path) -> str | None:
    """The checkpoint `checkpoint.keep_best` protects (None if none is recorded)."""
    path = Path(checkpoint_root) / BEST_FILE
    return json.loads(path.read_text())["tag"] if path.is_file() else None


class GenerationEval:
    """Built at the start of the loop; `after_step` and `finish` are collective (every rank calls them)."""

    def __init__(self, stage):
        from dsee_dist.data import dataset as data
        from dsee_dist.engine.checkpoint import checkpoint_root

        cfg = stage.cfg
        self.every = cfg.eval.generate_every_n_steps
        self.final = cfg.eval.final_generate
        self.keep_best = cfg.checkpoint.keep_best
        self.best = None
        if not (self.every > 0 or self.final):
            return
        check_generation_config(cfg)
        _, eval_source = data.data_sources(cfg, stage.ctx.out_dir)
        if not eval_source or not Path(eval_source).is_file():
            raise ConfigError(
                f"generation during training needs a local E2E CSV with references as the "
                f"evaluation set; '{eval_source}' is not one (set data.eval_path)"
            )
        self.refs = read_references(eval_source)
        self.prompts = [data.e2e_prompt(mr) for mr in self.refs.mrs]
        self.settings = DecodingSettings.from_config(cfg.generate)
        self.root = checkpoint_root(stage.out_dir)
        best_file = self.root / BEST_FILE
        if self.keep_best and best_file.is_file():  # a resumed run keeps comparing against its best so far
            recorded = json.loads(best_file.read_text())
            if recorded.get("metric") == self.keep_best and recorded.get("step", 0) <= stage.start_step:
                self.best = recorded

    def _decode(self, stage, prompts: list[str], settings: DecodingSettings, desc: str) -> list[str]:
        from dsee_dist.engine import distributed

        dist_info = stage.ctx.dist_info
        outputs, stats = generate_texts(
            stage.engine.module,
            stage.ctx.tokenizer,
            prompts,
            settings,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            synced_gpus=stage.engine.zero_optimization_stage() == 3,
            device=stage.device,
            progress=False,
            desc=desc,
        )
        stage.engine.train()
        distributed.barrier()
        logger.info(f"{desc}: {len(prompts)} MRs, {settings.describe()}, {stats.tokens_per_s:.1f} tokens/s")
        return outputs

    def after_step(self, stage, done: int) -> bool:
        """Every `eval.generate_every_n_steps`: decode, score, log. True when `checkpoint.keep_best` wants a
        checkpoint of this step (a new best)."""
        from dsee_dist.engine import distributed
        from dsee_dist.eval.metrics import score_e2e

        if self.every <= 0 or done % self.every:
            return False
        n = stage.cfg.eval.generate_max_examples
        subset = References(self.refs.groups[:n], self.refs.mrs[:n], self.refs.path)
        outputs = self._decode(stage, self.prompts[:n], self.settings.greedy(), f"step {done}: generate")

        def score() -> dict:
            values = score_e2e(outputs, subset.groups, metrics=("BLEU", "ROUGE_L"))
            return {"eval_bleu": values["BLEU"], "eval_rouge_l": values["ROUGE_L"]}

        result = distributed.on_rank_zero(score)
        stage.metrics.log(done, result)
        logger.info(
            f"step {done}: BLEU {result['eval_bleu']:.4f}, ROUGE-L {result['eval_rouge_l']:.4f} "
            f"on {len(subset.groups)} MRs (greedy)"
        )
        if not self.keep_best:
            return False
        value = result[f"eval_{self.keep_best}"]
        if self.best is not None and value <= self.best["value"]:
            return False
        from dsee_dist.engine.checkpoint import tag_for

        self.best = {"metric": self.keep_best, "value": value, "step": done, "tag": tag_for(done)}
        if stage.ctx.dist_info.is_rank_zero:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f"{BEST_FILE}.tmp"
            tmp.write_text(json.dumps(self.best, indent=1) + "\n")
            tmp.replace(self.root / BEST_FILE)
        logger.info(f"step {done}: new best {self.keep_best} {value:.4f}; its checkpoint is kept")
        return True

    def finish(self, stage) -> None:
        """`eval.final_generate`: the whole evaluation set with the generate: settings, outputs and scores."""
        from dsee_dist.engine import distributed

        if not self.final:
            return
        outputs = self._decode(stage, self.prompts, self.settings, "final generate")

        def write() -> None:
            from dsee_dist.recipes import evaluate
            from dsee_dist.recipes.generate import write_lines_atomic

            path = stage.out_dir / GENERATIONS
            write_lines_atomic(path, outputs)
            result = evaluate.score_outputs(outputs, self.refs, path)
            evaluate.write_json_atomic(evaluate.default_scores_path(path), result)
            figures = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in result["scores"].items())
            logger.info(f"final generate: {path} ({len(outputs)} MRs): {figures}")

        distributed.on_rank_zero(write)
