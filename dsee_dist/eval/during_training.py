"""Generation metrics inside training (called from the loop of `recipes/finetune.py`, which passes what it needs:
the model and tokenizer to decode with (`Decoder`), the run's directories, a metrics logger and a scoring
function; nothing here imports a recipe).

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsee_dist.engine import process_group
from dsee_dist.engine.checkpoint import BEST as BEST_FILE  # in checkpoints/: {"metric", "value", "step", "tag"}
from dsee_dist.errors import ConfigError
from dsee_dist.eval.decoding import DecodingSettings, generate_texts
from dsee_dist.eval.references import References, read_references
from dsee_dist.utils.files import write_json_atomic, write_lines_atomic

logger = logging.getLogger(__name__)

GENERATIONS = "generations.txt"


def check_generation_config(cfg) -> None:
    """The decoding settings as DecodingSettings accepts them (the config's own validation has checked the
    combinations generation during training needs when the config was loaded)."""
    DecodingSettings.from_config(cfg.generate)


@dataclass
class Decoder:
    """The model training decodes with, and how: `synced_gpus` when its parameters are partitioned (ZeRO-3),
    `resume_training` puts it back into training mode afterwards."""

    model: object
    tokenizer: object
    dist_info: process_group.DistInfo
    device: object
    synced_gpus: bool
    resume_training: Callable[[], None]


class GenerationEval:
    """Built at the start of the loop; `after_step` and `finish` are collective (every rank calls them).

    `run_dir`: the run's output.dir (where its data lives); `out_dir`: this stage's (checkpoints, outputs);
    `log_metrics(step, values)`: the metrics log; `score_final(outputs, refs, path)`: scores of the final
    outputs written at `path` (a dict with "scores"), rank 0 only."""

    def __init__(
        self,
        cfg,
        decoder: Decoder,
        *,
        run_dir: Path,
        out_dir: Path,
        start_step: int,
        log_metrics: Callable[[int, dict], None],
        score_final: Callable[[list[str], References, Path], dict],
    ):
        from dsee_dist.data import dataset as data
        from dsee_dist.engine.checkpoint import checkpoint_root

        self.cfg, self.decoder, self.out_dir = cfg, decoder, Path(out_dir)
        self.log_metrics, self.score_final = log_metrics, score_final
        self.every = cfg.eval.generate_every_n_steps
        self.final = cfg.eval.final_generate
        self.keep_best = cfg.checkpoint.keep_best
        self.best = None
        if not (self.every > 0 or self.final):
            return
        check_generation_config(cfg)
        _, eval_source = data.data_sources(cfg, run_dir)
        if not eval_source or not Path(eval_source).is_file():
            raise ConfigError(
                f"generation during training needs a local E2E CSV with references as the "
                f"evaluation set; '{eval_source}' is not one (set data.eval_path)"
            )
        self.refs = read_references(eval_source)
        self.prompts = [data.e2e_prompt(mr) for mr in self.refs.mrs]
        self.settings = DecodingSettings.from_config(cfg.generate)
        self.root = checkpoint_root(self.out_dir)
        best_file = self.root / BEST_FILE
        if self.keep_best and best_file.is_file():  # a resumed run keeps comparing against its best so far
            recorded = json.loads(best_file.read_text())
            if recorded.get("metric") == self.keep_best and recorded.get("step", 0) <= start_step:
                self.best = recorded

    def _decode(self, prompts: list[str], settings: DecodingSettings, desc: str) -> list[str]:
        d = self.decoder
        outputs, stats = generate_texts(
            d.model,
            d.tokenizer,
            prompts,
            settings,
            rank=d.dist_info.rank,
            world_size=d.dist_info.world_size,
            synced_gpus=d.synced_gpus,
            device=d.device,
            progress=False,
            desc=desc,
        )
        d.resume_training()
        process_group.barrier()
        logger.info(f"{desc}: {len(prompts)} MRs, {settings.describe()}, {stats.tokens_per_s:.1f} tokens/s")
        return outputs

    def after_step(self, done: int) -> bool:
        """Every `eval.generate_every_n_steps`: decode, score, log. True when `checkpoint.keep_best` wants a
        checkpoint of this step (a new best)."""
        from dsee_dist.eval.metrics import score_e2e

        if self.every <= 0 or done % self.every:
            return False
        n = self.cfg.eval.generate_max_examples
        subset = References(self.refs.groups[:n], self.refs.mrs[:n], self.refs.path)
        outputs = self._decode(self.prompts[:n], self.settings.greedy(), f"step {done}: generate")

        def score() -> dict:
            values = score_e2e(outputs, subset.groups, metrics=("BLEU", "ROUGE_L"))
            return {"eval_bleu": values["BLEU"], "eval_rouge_l": values["ROUGE_L"]}

        result = process_group.on_rank_zero(score)
        self.log_metrics(done, result)
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
        if self.decoder.dist_info.is_rank_zero:
            write_json_atomic(self.root / BEST_FILE, self.best)
        logger.info(f"step {done}: new best {self.keep_best} {value:.4f}; its checkpoint is kept")
        return True

    def finish(self) -> None:
        """`eval.final_generate`: the whole evaluation set with the generate: settings, outputs and scores."""
        if not self.final:
            return
        outputs = self._decode(self.prompts, self.settings, "final generate")

        def write() -> None:
            path = self.out_dir / GENERATIONS
            write_lines_atomic(path, outputs)
            result = self.score_final(outputs, self.refs, path)
            figures = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in result["scores"].items())
            logger.info(f"final generate: {path} ({len(outputs)} MRs): {figures}")

        process_group.on_rank_zero(write)
