"""Score system outputs with the five E2E figures, as the official E2E scorer computes them.

    dsee-dist evaluate --refs testset_w_refs.csv --hyp outputs.txt [--out scores.json]
    dsee-dist evaluate --perplexity TEXT_FILE --model SOURCE [--seq-len N]   (recipes/perplexity.py)

References: the E2E CSV (grouped by MR, in order of first appearance) or the official scorer's text
format (one reference per line, a blank line between MRs). Outputs: one line per MR, same order.
Prints a table and one JSON line; writes the scores (default: OUTPUTS.scores.json beside the outputs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dsee_dist.errors import DSEEError, reports_errors
from dsee_dist.eval.metrics import METRICS, E2EScorer, normalize_metric_names
from dsee_dist.eval.references import read_hypotheses, read_references
from dsee_dist.recipes import perplexity
from dsee_dist.utils.files import write_text_atomic

logger = logging.getLogger(__name__)


def default_scores_path(hyp_path: Path) -> Path:
    return hyp_path.with_name(hyp_path.stem + ".scores.json")


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def score_outputs(hyps: list[str], refs, hyp_path: Path, metrics=METRICS, scorer: E2EScorer | None = None) -> dict:
    """Scores of `hyps` against `refs` (a References) plus what was scored: a dict ready to print and write."""
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
        "refs": str(refs.path),
        "hyp": str(hyp_path),
        "tokenizer": scorer.tokenizer,
        "unavailable": dict(scorer.unavailable),
    }


def evaluate_files(refs_path: Path, hyp_path: Path, metrics=METRICS, scorer: E2EScorer | None = None) -> dict:
    refs = read_references(refs_path)
    hyps = read_hypotheses(hyp_path, len(refs.groups), refs_path)
    return score_outputs(hyps, refs, hyp_path, metrics, scorer)


def report(result: dict, out: Path) -> None:
    """Write the scores JSON (atomically), print the table and one JSON line."""
    write_json_atomic(out, result)
    print(format_table(result))
    print(json.dumps({**result["scores"], "num_mrs": result["num_mrs"], "scores_file": str(out)}), flush=True)


def format_table(result: dict) -> str:
    lines = [f"{'metric':<8}  score", f"{'-' * 8}  {'-' * 7}"]
    for name, value in result["scores"].items():
        lines.append(f"{name:<8}  {'n/a' if value is None else f'{value:.4f}'}")
    lines.append(f"{result['num_mrs']} MRs, {result['num_references']} references")
    for name, why in result["unavailable"].items():
        lines.append(f"{name} unavailable: {why}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refs", help="references: E2E CSV (mr,ref) or blank-line-separated text")
    parser.add_argument("--hyp", help="outputs: one line per MR, in the MRs' order of first appearance")
    parser.add_argument(
        "--out", help="scores JSON (default: beside the outputs, OUTPUTS.scores.json; with --perplexity: none)"
    )
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    perplexity.add_arguments(parser)


@reports_errors("evaluate")
def run(args: argparse.Namespace) -> int:
    if args.perplexity:
        if args.refs or args.hyp:
            raise DSEEError("--perplexity scores a model on a text; give it without --refs/--hyp")
        return perplexity.run(args)
    if not (args.refs and args.hyp):
        raise DSEEError("give --refs and --hyp (E2E scoring of outputs) or --perplexity TEXT_FILE --model SOURCE")
    logging.basicConfig(level=logging.INFO, format="[dsee] %(message)s")
    metrics = normalize_metric_names(args.metrics.split(","))
    hyp_path = Path(args.hyp)
    out = Path(args.out) if args.out else default_scores_path(hyp_path)
    result = evaluate_files(Path(args.refs), hyp_path, metrics)
    for why in result["unavailable"].values():
        print(f"dsee-dist evaluate: warning: {why}", file=sys.stderr)
    report(result, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsee-dist evaluate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
