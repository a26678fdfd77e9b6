"""Generate one output per input with a trained model (or any causal LM), on one rank or several.

    dsee-dist generate MODEL --input testset_w_refs.csv --output outputs.txt [--greedy] [--score]
    deepspeed --num_gpus 8 --module dsee_dist.generate MODEL --input ... --output ...

MODEL is (a) a training checkpoint (a step directory, a checkpoints/ root or a run's output.dir; any ZeRO
stage and world size), (b) an adapter export (`adapter/`, on the base model it records, or --base-model),
(c) a merged or pruned export, or (d) a plain Hugging Face model directory. A checkpoint or adapter runs
with its DSEE layers unmerged. Input: an E2E CSV (its distinct MRs in order of first appearance, in the
training prompt format `MR ||`) or a text file with one prompt per line; with --chat, a chat JSONL (`messages`
rows: a final assistant turn is removed and kept as the reference for --score) or a text file with one user
message per line, each rendered with the model's chat template and its generation prompt. Output: one line per
input, in input order, written once complete. Several ranks split the inputs and rank 0 writes the file; every rank
holds the whole model (no DeepSpeed engine here; for ZeRO-3 decoding inside training see
`dsee_dist/eval/during_training.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from dsee_dist.engine.process_exit import reports_errors
from dsee_dist.errors import DSEEError
from dsee_dist.eval.references import group_by_mr, is_table, read_mr_table
from dsee_dist.recipes.model_source import DTYPES, load_generation_model
from dsee_dist.utils.files import write_lines_atomic

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ inputs


def read_prompts(path: Path, prompt_format: str | None = None) -> tuple[list[str], list[str]]:
    """(the inputs as written, the prompts given to the model). CSV/TSV: distinct MRs in order of first
    appearance, formatted as in training (`e2e`); text: one input per line, used as is (`raw`)."""
    from dsee_dist.data.dataset import e2e_prompt

    if not path.is_file():
        raise DSEEError(f"input file '{path}' does not exist")
    if is_table(path):
        rows = read_mr_table(path, require_refs=False)
        inputs, _ = group_by_mr(rows)
        prompt_format = prompt_format or "e2e"
    else:
        inputs = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        blank = [i for i, line in enumerate(inputs, 1) if not line]
        if blank:
            raise DSEEError(f"{path}:{blank[0]}: empty input line; give one prompt per line")
        prompt_format = prompt_format or "raw"
    if not inputs:
        raise DSEEError(f"input file '{path}' has no inputs")
    prompts = [e2e_prompt(x) for x in inputs] if prompt_format == "e2e" else list(inputs)
    return inputs, prompts


def read_chat_inputs(path: Path, system_prompt: str | None = None) -> tuple[list[list[dict]], list[str] | None]:
    """(conversations to continue, their references or None): from a chat JSONL (a final assistant turn is the
    reference) or a text file (one user message per line)."""
    from dsee_dist.data.chat import normalize_messages
    from dsee_dist.eval.references import last_assistant_split

    if not path.is_file():
        raise DSEEError(f"input file '{path}' does not exist")
    conversations, references = [], []
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if path.suffix.lower() != ".jsonl":
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                raise DSEEError(f"{path}:{lineno}: empty input line; give one user message per line")
            conversations.append([{"role": "user", "content": line.strip()}])
        references = None
    else:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
                raw = row.get("messages", row.get("conversations"))
            except (json.JSONDecodeError, AttributeError):
                raise DSEEError(f"{where}: each line must be a JSON object with 'messages'") from None
            messages = normalize_messages(raw, where, require_assistant=False)
            reference = None
            if messages[-1]["role"] == "assistant":  # the reference; else nothing to compare with
                messages, reference = last_assistant_split(messages, where)
            conversations.append(messages)
            references.append(reference)
        if any(r is None for r in references):
            references = None
    if not conversations:
        raise DSEEError(f"input file '{path}' has no inputs")
    if system_prompt:
        conversations = [
            c if c[0]["role"] == "system" else [{"role": "system", "content": system_prompt}, *c] for c in conversations
        ]
    return conversations, references


def render_chat_prompts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Each conversation rendered with the tokenizer's chat template, ending in the assistant's generation prompt."""
    from dsee_dist.data.chat import require_chat_template

    require_chat_template(tokenizer)
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def e2e_prompts(tokenizer, mrs: list[str], chat: bool = False) -> list[str]:
    """E2E inputs as prompts: `MR ||` (the training format) or, with `chat`, the tokenizer's chat template around
    the one-line instruction (an instruct model's fair zero-shot prompt), ending in the generation prompt."""
    from dsee_dist.data.encoding import e2e_chat_messages, e2e_prompt

    if chat:
        return render_chat_prompts(tokenizer, [e2e_chat_messages(mr) for mr in mrs])
    return [e2e_prompt(mr) for mr in mrs]


# ------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a checkpoint, a run's output.dir, an adapter export, or a model directory")
    parser.add_argument("--input", required=True, help="E2E CSV (its distinct MRs) or a text file of prompts")
    parser.add_argument("--output", required=True, help="one output line per input, in input order")
    parser.add_argument("--base-model", help="base model directory (default: the one the checkpoint/adapter records)")
    parser.add_argument("--config", help="experiment YAML whose generate: section gives the decoding settings")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (instead of the beam search)")
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--length-penalty", type=float)
    parser.add_argument("--no-repeat-ngram-size", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int, help="inputs per generate call, per rank")
    parser.add_argument("--no-stop-at-newline", action="store_true", help="stop at EOS only")
    parser.add_argument(
        "--prompt-format",
        choices=("e2e", "raw"),
        help="e2e: 'MR ||' as in training (default for a CSV); raw: the line as is (default for text)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="render inputs with the model's chat template: a chat JSONL (a final assistant turn is the reference) "
        "or one user message per line",
    )
    parser.add_argument("--system-prompt", help="with --chat: a system message for conversations that have none")
    parser.add_argument("--max-inputs", type=int, default=0, help="only the first N inputs (0 = all)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument(
        "--score",
        action="store_true",
        help="then score the outputs against the input CSV's references (dsee-dist evaluate)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def decoding_settings(args: argparse.Namespace):
    from dsee_dist.config.schema import GenerateConfig
    from dsee_dist.eval.decoding import DecodingSettings

    section = GenerateConfig()
    if args.config:
        from dsee_dist.config import load_config

        section = load_config(args.config).generate
    settings = DecodingSettings.from_config(
        section,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        stop_at_newline=False if args.no_stop_at_newline else None,
    )
    if args.greedy:
        settings = settings.greedy()
    return settings


def score_against_input(input_path: Path, output_path: Path, outputs: list[str]) -> None:
    """The five E2E figures of `outputs` against the references of the first len(outputs) MRs of the input CSV,
    printed and written beside the outputs (OUTPUTS.scores.json)."""
    from dsee_dist.eval.references import References, read_references
    from dsee_dist.recipes import evaluate

    refs = read_references(input_path)
    refs = References(refs.groups[: len(outputs)], refs.mrs[: len(outputs)], refs.path)
    result = evaluate.score_outputs(outputs, refs, output_path)
    for why in result["unavailable"].values():
        logger.warning(why)
    evaluate.report(result, evaluate.default_scores_path(output_path))


def score_against_references(references: list[str], input_path: Path, output_path: Path, outputs: list[str]):
    """Free-text scores (BLEU, chrF, ROUGE-L, exact match) of chat outputs against their references."""
    from dsee_dist.eval.references import References
    from dsee_dist.recipes import evaluate

    refs = References([[r] for r in references], None, input_path)
    result = evaluate.score_text_outputs(outputs, refs, output_path)
    evaluate.report(result, evaluate.default_scores_path(output_path))


def read_inputs(args: argparse.Namespace) -> tuple[list[str] | None, list[list[dict]] | None, list[str] | None]:
    """(prompts, or with --chat the conversations to render once the tokenizer is loaded; the chat references)
    of the first --max-inputs inputs; --score without references is refused."""
    if args.chat:
        conversations, references = read_chat_inputs(Path(args.input), args.system_prompt)
        n = args.max_inputs if args.max_inputs > 0 else len(conversations)
        conversations, references = conversations[:n], references[:n] if references else None
        if args.score and references is None:
            raise DSEEError("--score with --chat needs a chat JSONL whose every row ends with an assistant turn")
        return None, conversations, references
    _, prompts = read_prompts(Path(args.input), args.prompt_format)
    if args.max_inputs > 0:
        prompts = prompts[: args.max_inputs]
    if args.score and not is_table(Path(args.input)):
        raise DSEEError("--score needs an E2E CSV input with references (mr,ref), or --chat with a chat JSONL")
    return prompts, None, None


def generate(args: argparse.Namespace) -> None:
    from dsee_dist.engine import process_group
    from dsee_dist.eval.decoding import generate_texts

    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
    # Everything that can be wrong with the request is checked before any rank joins the process group.
    settings = decoding_settings(args)
    prompts, conversations, references = read_inputs(args)
    if not Path(args.model).exists():
        raise DSEEError(
            f"model '{args.model}' does not exist; give a checkpoint, an adapter export or a model directory"
        )
    if Path(args.output).is_dir():
        raise DSEEError(f"--output '{args.output}' is a directory; give a file name")
    dist_info = process_group.init_distributed()
    logging.basicConfig(
        level=logging.INFO if dist_info.is_rank_zero else logging.WARNING,
        format=f"[dsee rank{dist_info.rank}] %(message)s",
        stream=sys.stdout,
    )
    model, tokenizer, kind = load_generation_model(args.model, args.base_model, args.dtype)
    if conversations is not None:
        prompts = render_chat_prompts(tokenizer, conversations)
    model.to(process_group.device())
    logger.info(
        f"generate: {len(prompts)} inputs from {args.input} with {kind} on {dist_info.world_size} rank(s); "
        f"{settings.describe()}, batches of {settings.batch_size}"
    )
    outputs, stats = generate_texts(
        model,
        tokenizer,
        prompts,
        settings,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        progress=dist_info.is_rank_zero,
    )
    logger.info(
        f"generate: {stats.new_tokens} new tokens in {stats.seconds:.1f} s: {stats.tokens_per_s:.1f} tokens/s "
        f"(all ranks)"
    )
    empty = sum(1 for text in outputs if not text)
    if empty:
        logger.warning(f"generate: {empty} of {len(outputs)} outputs are empty")
    if dist_info.is_rank_zero:
        write_lines_atomic(Path(args.output), outputs)
        logger.info(f"generate: {len(outputs)} lines written to {args.output}")
        if args.score and references is not None:
            score_against_references(references, Path(args.input), Path(args.output), outputs)
        elif args.score:
            score_against_input(Path(args.input), Path(args.output), outputs)
    process_group.barrier()


@reports_errors("dsee-dist generate")
def main(argv: list[str] | None = None, prog: str = "dsee-dist generate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_arguments(parser)
    generate(parser.parse_args(argv))
    return 0
