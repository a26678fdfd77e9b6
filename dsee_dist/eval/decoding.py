"""Batched decoding with transformers' `generate`: left padding, the KV cache, greedy or beam search.

Inputs are sorted by prompt length and cut into batches of `batch_size` *before* they are split across
ranks (whole batches, round robin), so every batch, and so every output, is the same at any world size.
Outputs come back in input order on every rank.

Under ZeRO-3 (a partitioned model inside a DeepSpeed engine) every rank must run each forward together:
pass `synced_gpus=True`. transformers' `generate` then keeps every rank stepping until all are done, and
DeepSpeed gathers one layer's parameters at a time during each forward, so no rank ever holds the whole
model. Ranks with fewer batches run a copy of the last batch and drop its outputs (`engine.rank_share`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import torch

from dsee_dist.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodingSettings:
    """What `generate` is asked for. The defaults are the LoRA paper's E2E decoding."""

    num_beams: int = 10
    length_penalty: float = 0.9
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    batch_size: int = 16
    stop_at_newline: bool = True

    @classmethod
    def from_config(cls, section, **overrides) -> DecodingSettings:
        """From the config's `generate:` section (or anything with the same attributes), with overrides."""
        values = {name: getattr(section, name) for name in cls.__dataclass_fields__}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).checked()

    def greedy(self) -> DecodingSettings:
        """Plain greedy decoding with the same length limit, batch size and stopping rule."""
        return DecodingSettings(
            num_beams=1,
            length_penalty=1.0,
            no_repeat_ngram_size=0,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            stop_at_newline=self.stop_at_newline,
        )

    def checked(self) -> DecodingSettings:
        problems = []
        for key in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                problems.append(f"generate.{key} must be at least 1, got {getattr(self, key)}")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"generate.no_repeat_ngram_size must be 0 (off) or more, got {self.no_repeat_ngram_size}")
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def describe(self) -> str:
        if self.num_beams == 1 and self.no_repeat_ngram_size == 0:
            return f"greedy, at most {self.max_new_tokens} new tokens"
        return (
            f"beam {self.num_beams}, length penalty {self.length_penalty}, no-repeat {self.no_repeat_ngram_size}"
            f"-grams, at most {self.max_new_tokens} new tokens"
        )


def stop_token_ids(tokenizer, stop_at_newline: bool) -> list[int]:
    """EOS, and with `stop_at_newline` every token whose text contains a newline."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if stop_at_newline:
        vocab = range(len(tokenizer))
        ids += [i for i, text in zip(vocab, tokenizer.batch_decode([[i] for i in vocab])) if "\n" in text]
    if not ids:
        raise ConfigError(
            "the tokenizer has no EOS token and generate.stop_at_newline is false: nothing would "
            "end an output before generate.max_new_tokens"
        )
    return sorted(set(ids))


def prepare_tokenizer(tokenizer):
    """Left padding (generation continues right after each prompt's last token); pad = EOS if none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def plan_batches(prompt_lengths: list[int], batch_size: int) -> list[list[int]]:
    """Input indices, longest prompts first (stable), in batches of `batch_size`."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: -prompt_lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def clean_output(text: str, first_line: bool = True) -> str:
    """One output line per input: the text up to its first newline (`first_line`, decoding that stops at a
    newline) or every line joined by single spaces (decoding that stops at EOS only), stripped."""
    if first_line:
        return text.split("\n", 1)[0].replace("\r", " ").strip()
    return " ".join(text.split())


@dataclass
class DecodeStats:
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _decode_batch(
    model, tokenizer, prompts: list[str], settings: DecodingSettings, stop_ids: list[int], device, synced_gpus: bool
) -> tuple[list[str], int]:
    from transformers import GenerationConfig

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    beam = {"length_penalty": settings.length_penalty, "early_stopping": True} if settings.num_beams > 1 else {}
    generation = GenerationConfig(
        do_sample=False,
        num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **beam,
    )
    out = model.generate(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        generation_config=generation,
        synced_gpus=synced_gpus,
    )
    new = out[:, enc["input_ids"].shape[1] :].cpu()
    texts, count = [], 0
    stop = torch.tensor(stop_ids)
    for row in new:
        ends = torch.nonzero(torch.isin(row, stop)).flatten()
        length = int(ends[0]) + 1 if len(ends) else len(row)
        count += length
        texts.append(clean_output(tokenizer.decode(row[:length], skip_special_tokens=True), settings.stop_at_newline))
    return texts, count


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    settings: DecodingSettings,
    *,
    rank: int = 0,
    world_size: int = 1,
    synced_gpus: bool = False,
    device=None,
    progress: bool = False,
    desc: str = "generate",
) -> tuple[list[str], DecodeStats]:
    """Outputs for `prompts`, in input order, on every rank (this rank decodes its share of the batches).

    `model` is a plain causal LM (DSEE layers unmerged or merged) or, under ZeRO-3, the engine's module with
    `synced_gpus=True`. Collective when world_size > 1: every rank must call it with the same prompts."""
    from dsee_dist.engine import process_group

    if not prompts:
        return [], DecodeStats(0, 0.0)
    prepare_tokenizer(tokenizer)
    device = device or next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, settings.stop_at_newline)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    batches = plan_batches(lengths, settings.batch_size)
    share = process_group.rank_share(batches, rank, world_size, lockstep=synced_gpus)
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="input", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    t0, new_tokens, results = time.time(), 0, {}
    for indices, counts in share:  # a round that only keeps pace with the other ranks is dropped
        texts, count = _decode_batch(
            model, tokenizer, [prompts[j] for j in indices], settings, stop_ids, device, synced_gpus
        )
        if counts:
            results.update(zip(indices, texts))
            new_tokens += count
            if bar is not None:
                bar.update(min(len(indices) * world_size, bar.total - bar.n))  # the other ranks keep pace
    if bar is not None:
        bar.close()
    model.train(was_training)
    seconds = time.time() - t0
    gathered = process_group.all_gather_object(results) if world_size > 1 else [results]
    merged = {k: v for part in gathered for k, v in part.items()}
    (total_tokens,) = process_group.all_reduce_sum([new_tokens]) if world_size > 1 else (new_tokens,)
    return [merged[i] for i in range(len(prompts))], DecodeStats(int(total_tokens), seconds)
