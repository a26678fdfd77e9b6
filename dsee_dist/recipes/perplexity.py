"""`dsee-dist evaluate --perplexity TEXT_FILE --model SOURCE [--seq-len N]`: perplexity of any model
`dsee-dist generate` loads (a checkpoint, an adapter export, a merged or pruned export, a Hugging Face
directory) on a text file, by the protocol of `dsee_dist/eval/perplexity.py`.

    dsee-dist evaluate --perplexity ../shared/data/text/wikitext2-test.txt --model runs/x/final
    torchrun --nproc-per-node 2 -m dsee_dist evaluate --perplexity wikitext2-test.txt --model runs/x/final

Prints a table and one JSON line (rank 0); --out also writes the JSON. Several ranks split the windows;
every rank holds the whole model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dsee_dist.errors import DSEEError
from dsee_dist.eval import perplexity
from dsee_dist.utils.files import write_json_atomic

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("perplexity (instead of --refs/--hyp)")
    group.add_argument("--perplexity", metavar="TEXT_FILE", help="perplexity of --model on this text file")
    group.add_argument(
        "--model",
        help="a checkpoint, a run's output.dir, an adapter export, a merged/pruned export or a model directory",
    )
    group.add_argument(
        "--seq-len",
        type=int,
        help=f"window length in tokens (default: min(model context, {perplexity.DEFAULT_MAX_SEQ_LEN}))",
    )
    group.add_argument("--base-model", help="base model directory (default: the one the checkpoint/adapter records)")
    group.add_argument("--batch-size", type=int, default=1, help="windows per forward pass, per rank")
    group.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")


def check_request(args: argparse.Namespace) -> None:
    """Everything checkable before any rank joins the process group or loads a model."""
    if not args.model:
        raise DSEEError("--perplexity needs --model SOURCE (a checkpoint, an adapter export or a model directory)")
    if not Path(args.perplexity).is_file():
        raise DSEEError(f"text file '{args.perplexity}' does not exist")
    if not Path(args.model).exists():
        raise DSEEError(
            f"model '{args.model}' does not exist; give a checkpoint, an adapter export or a model directory"
        )
    if args.seq_len is not None and args.seq_len < 2:
        raise DSEEError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.batch_size < 1:
        raise DSEEError(f"--batch-size must be at least 1, got {args.batch_size}")


def score_model(args: argparse.Namespace) -> int:
    """`dsee-dist evaluate --perplexity`: the perplexity of --model on the text (rank 0 prints it)."""
    from transformers.utils import logging as transformers_logging

    from dsee_dist.engine import process_group
    from dsee_dist.recipes.model_source import load_generation_model

    check_request(args)
    text = perplexity.read_text(Path(args.perplexity))
    dist_info = process_group.init_distributed()
    logging.basicConfig(
        level=logging.INFO if dist_info.is_rank_zero else logging.WARNING,
        format=f"[dsee rank{dist_info.rank}] %(message)s",
        stream=sys.stderr,
    )
    transformers_logging.disable_progress_bar()  # stdout is the table and the JSON line; stderr one error line
    model, tokenizer, kind = load_generation_model(args.model, args.base_model, args.dtype)
    model.to(process_group.device())
    seq_len = perplexity.resolve_seq_len(args.seq_len, model.config)
    token_ids = perplexity.tokenize(tokenizer, text)
    logger.info(
        f"perplexity: {token_ids.numel():,} tokens of {args.perplexity}, windows of {seq_len}, with {kind} "
        f"on {dist_info.world_size} rank(s)"
    )
    result = perplexity.compute_perplexity(
        model,
        token_ids,
        seq_len,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        batch_size=args.batch_size,
        log=logger.info,
    )
    if dist_info.is_rank_zero:
        payload = {**result.to_dict(), "text": str(args.perplexity), "model": str(args.model)}
        if args.out:
            write_json_atomic(Path(args.out), payload)
        print(perplexity.format_table(result, str(args.perplexity), f"{args.model} ({kind})"))
        print(json.dumps(payload), flush=True)
    process_group.barrier()
    return 0
