"""Decoding for the quality table: every row's final model is an ordinary Hugging Face directory, decoded by
the same function with the same settings, so rows differ only in their weights.

The decoding settings are named (`DECODINGS`) and recorded with every row; the report never puts rows
decoded differently into one table.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from dsee_dist.data.dataset import e2e_prompt

logger = logging.getLogger(__name__)

# greedy: the CPU setting. beam: the LoRA paper's E2E decoding (beam 10, length penalty 0.9, no repeated
# 4-gram), used when a GPU is available. Both stop at EOS or a newline, at most 64 new tokens.
DECODINGS = {
    "greedy": {"num_beams": 1, "do_sample": False, "max_new_tokens": 64},
    "beam10": {"num_beams": 10, "do_sample": False, "max_new_tokens": 64, "length_penalty": 0.9,
               "no_repeat_ngram_size": 4, "early_stopping": True},
}


def load_decoder(model_dir: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsee_dist.models.pruned_gpt2 import register

    register()  # a structurally pruned GPT-2 export loads without remote code
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.config.use_cache = True
    return model, tokenizer


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for text in ("\n", " \n", "\n\n"):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.add(encoded[0])
    return sorted(i for i in ids if i is not None)


def clean_output(text: str) -> str:
    """The first line of a generation, stripped (an empty generation becomes a single '-')."""
    line = text.split("\n")[0].strip()
    return line or "-"


@torch.no_grad()
def decode_mrs(model, tokenizer, mrs: list[str], decoding: str, batch_size: int, max_new_tokens: int = 64,
               log_every: int = 0) -> tuple[list[str], dict]:
    """One output line per MR (prompt "MR ||", as in training) and the timing of the whole decode."""
    settings = {**DECODINGS[decoding], "max_new_tokens": max_new_tokens}
    stop = _stop_ids(tokenizer)
    outputs, new_tokens, start = [], 0, time.perf_counter()
    device = next(model.parameters()).device
    for first in range(0, len(mrs), batch_size):
        batch = [e2e_prompt(mr) for mr in mrs[first:first + batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, **settings, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        gen = out[:, enc["input_ids"].shape[1]:]
        new_tokens += int((~torch.isin(gen, torch.tensor(stop + [tokenizer.pad_token_id], device=gen.device))).sum())
        outputs += [clean_output(t) for t in tokenizer.batch_decode(gen, skip_special_tokens=True)]
        if log_every and (first // batch_size + 1) % log_every == 0:
            logger.info("decoded %d / %d MRs", len(outputs), len(mrs))
    seconds = time.perf_counter() - start
    return outputs, {"decode_s": round(seconds, 2), "new_tokens": new_tokens, "decoding": decoding,
                     "settings": settings, "batch_size": batch_size}


@torch.no_grad()
def greedy_tokens_per_s(models: dict[str, tuple], mrs: list[str], new_tokens: int = 32, repeats: int = 3) -> dict:
    """Greedy decoding speed of several models on the same batch, measured side by side: every model
    generates exactly `new_tokens` per sequence (min = max), the models alternate in each repetition,
    and the median tokens/s of the repetitions is reported."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(repeats + 1):  # repetition 0 warms up
        for name, (model, tokenizer) in models.items():
            device = next(model.parameters()).device
            enc = tokenizer([e2e_prompt(mr) for mr in mrs], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=tokenizer.pad_token_id)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - start)
    return {name: len(mrs) * new_tokens / statistics.median(t) for name, t in times.items()}
