"""Score system outputs: the five E2E figures, as the official E2E scorer computes them, or, for any other task,
BLEU, chrF, ROUGE-L and exact match against one or more free-text references per input.

    dsee-dist evaluate --refs testset_w_refs.csv --hyp outputs.txt [--out scores.json]
    dsee-dist evaluate --refs chats.jsonl --hyp outputs.txt
    dsee-dist evaluate --perplexity TEXT_FILE --model SOURCE [--seq-len N]   (recipes/perplexity.py)

References: the E2E CSV (grouped by MR, in order of first appearance) or the official scorer's text
format (one reference per line, a blank line between MRs); or JSONL, one input per line, with `references`,
`reference`, `output`, `completion` or chat `messages` (the last assistant turn): eval/references.py.
Outputs: one line per input, same order; an empty line is an empty output, scored as such and counted.
Prints a table and one JSON line; writes the scores (default: OUTPUTS.scores.json beside the outputs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dsee_dist.engine.process_exit import reports_errors
from dsee_dist.errors import DSEEError
from dsee_dist.eval.metrics import METRICS, E2EScorer, normalize_metric_names
from dsee_dist.eval.references import read_hypotheses, read_references, read_text_references
from dsee_dist.eval.text_metrics import TEXT_METRICS, normalize_text_metric_names, score_text
from dsee_dist.recipes import perplexity
from dsee_dist.utils.files import write_json_atomic

logger = logging.getLogger(__name__)


def default_scores_path(hyp_path: Path) -> Path:
    return hyp_path.with_name(hyp_path.stem + ".scores.json")


def is_free_text(refs_path: Path) -> bool:
    """JSONL references are free text (any task); CSV/TSV and the official text format are E2E's."""
    return refs_path.suffix.lower() == ".jsonl"


def score_outputs(hyps: list[str], refs, hyp_path: Path, metrics=METRICS, scorer: E2EScorer | None = None) -> dict:
    """E2E scores of `hyps` against `refs` (a References) plus what was scored: a dict ready to print and write."""
    own = scorer is None
    scorer = scorer or E2EScorer(metrics)
    try:
        scores = scorer.score(hyps, refs.groups)
    finally:
        if own:
            scorer.close()
    return {
        "scores": scores,
        "num_mrs": len(refs.groups),
        "num_references": refs.num_references,
        "empty_outputs": sum(1 for h in hyps if not h),
        "refs": str(refs.path),
        "hyp": str(hyp_path),
        "tokenizer": scorer.tokenizer,
        "unavailable": dict(scorer.unavailable),
    }


def score_text_outputs(hyps: list[str], refs, hyp_path: Path, metrics=TEXT_METRICS) -> dict:
    """Free-text scores of `hyps` against `refs` (eval/text_metrics.py), in the same layout as score_outputs."""
    return {
        "scores": score_text(hyps, refs.groups, metrics),
        "num_mrs": len(refs.groups),
        "num_references": refs.num_references,
        "empty_outputs": sum(1 for h in hyps if not h),
        "refs": str(refs.path),
        "hyp": str(hyp_path),
        "tokenizer": "sacrebleu 13a (BLEU, chrF); lower-cased whitespace (ROUGE_L)",
        "unavailable": {},
    }


def write_scores(hyps: list[str], refs, hyp_path: Path) -> dict:
    """`score_outputs` of the outputs written at `hyp_path`, also written beside them (OUTPUTS.scores.json)."""
    result = score_outputs(hyps, refs, hyp_path)
    write_json_atomic(default_scores_path(hyp_path), result)
    return result


def evaluate_files(refs_path: Path, hyp_path: Path, metrics=None, scorer: E2EScorer | None = None) -> dict:
    if is_free_text(refs_path):
        refs = read_text_references(refs_path)
        hyps = read_hypotheses(hyp_path, len(refs.groups), refs_path)
        return score_text_outputs(hyps, refs, hyp_path, metrics or TEXT_METRICS)
    refs = read_references(refs_path)
    hyps = read_hypotheses(hyp_path, len(refs.groups), refs_path)
    return score_outputs(hyps, refs, hyp_path, metrics or METRICS, scorer)


def report(result: dict, out: Path) -> None:
    """Write the scores JSON (atomically), print the table and one JSON line."""
    write_json_atomic(out, result)
    print(format_table(result))
    summary = {**result["scores"], "num_mrs": result["num_mrs"], "empty_outputs": result.get("empty_outputs", 0)}
    print(json.dumps({**summary, "scores_file": str(out)}), flush=True)


def format_table(result: dict) -> str:
    lines = [f"{'metric':<8}  score", f"{'-' * 8}  {'-' * 7}"]
    for name, value in result["scores"].items():
        lines.append(f"{name:<8}  {'n/a' if value is None else f'{value:.4f}'}")
    lines.append(f"{result['num_mrs']} inputs, {result['num_references']} references")
    if result.get("empty_outputs"):
        lines.append(f"{result['empty_outputs']} empty outputs (scored as empty)")
    for name, why in result["unavailable"].items():
        lines.append(f"{name} unavailable: {why}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--refs", help="references: E2E CSV (mr,ref) or blank-line-separated text; or JSONL of free-text references"
    )
    parser.add_argument("--hyp", help="outputs: one line per input (per MR, in order of first appearance)")
    parser.add_argument(
        "--out", help="scores JSON (default: beside the outputs, OUTPUTS.scores.json; with --perplexity: none)"
    )
    parser.add_argument(
        "--metrics",
        help=f"comma-separated subset of {','.join(METRICS)} (E2E) or {','.join(TEXT_METRICS)} (free text)",
    )
    perplexity.add_arguments(parser)


@reports_errors("dsee-dist evaluate")
def main(argv: list[str] | None = None, prog: str = "dsee-dist evaluate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.perplexity:
        if args.refs or args.hyp:
            raise DSEEError("--perplexity scores a model on a text; give it without --refs/--hyp")
        return perplexity.score_model(args)
    if not (args.refs and args.hyp):
        raise DSEEError("give --refs and --hyp (scoring outputs) or --perplexity TEXT_FILE --model SOURCE")
    logging.basicConfig(level=logging.INFO, format="[dsee] %(message)s")
    hyp_path = Path(args.hyp)
    metrics = None
    if args.metrics:
        normalize = normalize_text_metric_names if is_free_text(Path(args.refs)) else normalize_metric_names
        metrics = normalize(args.metrics.split(","))
    out = Path(args.out) if args.out else default_scores_path(hyp_path)
    result = evaluate_files(Path(args.refs), hyp_path, metrics)
    for why in result["unavailable"].values():
        print(f"dsee-dist evaluate: warning: {why}", file=sys.stderr)
    report(result, out)
    return 0
