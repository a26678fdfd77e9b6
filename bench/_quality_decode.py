"""Decoding for the quality table: every row's final model is an ordinary Hugging Face directory, decoded by
the same function with the same settings, so rows differ only in their weights.

The decoding settings are named (`DECODINGS`) and recorded with every row; the report never puts rows
decoded differently into one table.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics

import torch

logger = logging.getLogger(__name__)

DECODINGS = ("greedy", "beam10")  # greedy: the CPU setting; beam10: the LoRA paper's E2E decoding (GPU)


def decoding_settings(decoding: str, max_new_tokens: int = 64, batch_size: int = 16):
    """dsee_dist.eval.decoding's settings for a named decoding: `beam10` = beam 10, length penalty 0.9, no
    repeated 4-gram; `greedy` = the same limits without search. Both stop at EOS or a newline."""
    from dsee_dist.eval.decoding import DecodingSettings

    beam = DecodingSettings(max_new_tokens=max_new_tokens, batch_size=batch_size).checked()
    return beam if decoding == "beam10" else beam.greedy()


def load_decoder(model_dir: str, device: str, dtype: torch.dtype):
    """(model, tokenizer) of a Hugging Face directory, through `dsee-dist generate`'s loader."""
    from dsee_dist.recipes.generate import load_generation_model

    model, tokenizer, _ = load_generation_model(str(model_dir), dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    model = model.to(device)
    model.config.use_cache = True
    return model, tokenizer


def decode_mrs(
    model, tokenizer, mrs: list[str], decoding: str, batch_size: int, max_new_tokens: int = 64, prompt: str = "e2e"
) -> tuple[list[str], dict]:
    """One output line per MR (prompt "e2e": "MR ||" as in training, or "chat": the chat template around the
    instruction; dsee_dist.recipes.generate.e2e_prompts) with dsee_dist.eval.decoding, and its timing."""
    from dsee_dist.eval.decoding import generate_texts
    from dsee_dist.recipes.generate import e2e_prompts

    settings = decoding_settings(decoding, max_new_tokens, batch_size)
    outputs, stats = generate_texts(model, tokenizer, e2e_prompts(tokenizer, mrs, prompt == "chat"), settings)
    outputs = [o or "-" for o in outputs]  # an empty generation still gets a line (scored as one token)
    return outputs, {
        "decode_s": round(stats.seconds, 2),
        "new_tokens": stats.new_tokens,
        "decoding": decoding,
        "decoding_settings": dataclasses.asdict(settings),
        "decoding_described": settings.describe(),
        "prompt": prompt,
    }


def greedy_tokens_per_s(models: dict[str, tuple], mrs: list[str], new_tokens: int = 32, repeats: int = 3) -> dict:
    """Greedy decoding speed of several models on the same batch, measured side by side: every model
    generates exactly `new_tokens` per sequence (min = max: bench/_common.exact_generate_seconds), the models
    alternate in each repetition, and the median tokens/s of the repetitions is reported."""
    from bench._common import exact_generate_seconds
    from dsee_dist.eval.decoding import prepare_tokenizer
    from dsee_dist.recipes.generate import e2e_prompts

    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(repeats + 1):  # repetition 0 warms up
        for name, (model, tokenizer) in models.items():
            device = next(model.parameters()).device
            enc = prepare_tokenizer(tokenizer)(
                e2e_prompts(tokenizer, mrs), return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            seconds = exact_generate_seconds(
                model, enc["input_ids"], enc["attention_mask"], new_tokens, tokenizer.pad_token_id
            )
            if rep:
                times[name].append(seconds)
    return {name: len(mrs) * new_tokens / statistics.median(t) for name, t in times.items()}
