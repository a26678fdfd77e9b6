"""Tiny pretrained-looking models for the benchmark pipeline tests: random weights, a BPE tokenizer trained on
the built-in E2E sample, saved as ordinary Hugging Face directories."""

import csv
from pathlib import Path

import pytest

from tests.conftest import REPO

SAMPLE = REPO / "dsee_dist" / "data" / "e2e_sample"
# ChatML, as SmolLM2's (without its default system prompt)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _sample_texts() -> list[str]:
    with open(SAMPLE / "train.csv", newline="") as f:
        return [r["mr"] + " || " + r["ref"] for r in csv.DictReader(f)]


def save_tiny_model(family: str, target: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from dsee_dist.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(_sample_texts(), 400)
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    if family == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=256,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=4,
            vocab_size=len(tokenizer),
            n_positions=256,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
        model = GPT2LMHeadModel(config)
    if family == "llama":  # an instruct-looking model: the chat rows render through this template
        tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_model(family, root / family) for family in ("llama", "gpt2")}
