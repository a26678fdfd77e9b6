"""Batched decoding (left padding, KV cache) equals one-prompt-at-a-time greedy decoding without a cache, for
tiny random GPT-2 and Llama models carrying unmerged DSEE layers; merged equals unmerged; the beam settings
reach transformers' beam search; the generate: section and its checks."""

import pytest
import torch

from dsee_dist.data.synthetic_e2e import generate_examples
from dsee_dist.dsee.inject import find_targets, inject_dsee
from dsee_dist.errors import ConfigError
from dsee_dist.eval.decoding import (
    DecodingSettings,
    clean_output,
    generate_texts,
    plan_batches,
    prepare_tokenizer,
    stop_token_ids,
)
from dsee_dist.models.tokenizer import train_bpe_tokenizer

MAX_NEW = 12


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"{mr} || {ref}\n" for mr, ref in generate_examples(300, 0)]
    return prepare_tokenizer(train_bpe_tokenizer(texts, 400))


@pytest.fixture(scope="module")
def prompts():
    return [f"{mr} ||" for mr, _ in generate_examples(11, 1)]  # lengths differ: left padding is exercised


def _dsee_model(kind: str, vocab: int):
    """A random model (large init: varied outputs) with DSEE layers whose B and S are non-zero."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_layer=2,
                n_embd=32,
                n_head=4,
                vocab_size=vocab,
                n_positions=128,
                bos_token_id=0,
                eos_token_id=0,
                initializer_range=0.3,
            )
        )
        specs = find_targets(model, ["c_attn"], ["q", "v"])
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=vocab,
                max_position_embeddings=128,
                bos_token_id=0,
                eos_token_id=0,
                initializer_range=0.3,
            )
        )
        specs = find_targets(model, ["q_proj", "v_proj"], [])
    support = {m: torch.stack([torch.arange(8), torch.arange(8) * 3]) for s in specs for m in s.matrix_names()}
    layers = inject_dsee(model, specs, support, rank=4, alpha=8, dropout=0.0, seed=0)
    with torch.no_grad():
        for layer in layers.values():
            for param in layer.adapter_params().values():
                param.normal_(0, 0.3)
    return model.eval()


def _greedy_one_by_one(model, tokenizer, prompt: str, stop_ids: list[int]) -> str:
    """The reference: full forward of the whole sequence at every step, no cache, no padding, argmax."""
    ids, new = tokenizer(prompt, add_special_tokens=False)["input_ids"], []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
            if new[-1] in stop_ids:
                break
    return clean_output(tokenizer.decode(new, skip_special_tokens=True))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batched_greedy_equals_one_prompt_at_a_time_without_cache(kind, tokenizer, prompts):
    torch.set_num_threads(1)
    model = _dsee_model(kind, len(tokenizer))
    settings = DecodingSettings(max_new_tokens=MAX_NEW, batch_size=4).greedy()
    outputs, stats = generate_texts(model, tokenizer, prompts, settings)
    stop_ids = stop_token_ids(tokenizer, True)
    expected = [_greedy_one_by_one(model, tokenizer, p, stop_ids) for p in prompts]
    assert outputs == expected
    assert len(set(outputs)) > len(outputs) // 2 and 0 < stats.new_tokens <= MAX_NEW * len(prompts)


def test_merged_layers_give_the_unmerged_greedy_output(tokenizer, prompts):
    from dsee_dist.recipes.export import merge_into_base

    torch.set_num_threads(1)
    model = _dsee_model("gpt2", len(tokenizer))
    settings = DecodingSettings(max_new_tokens=MAX_NEW, batch_size=16).greedy()
    unmerged, _ = generate_texts(model, tokenizer, prompts, settings)
    merge_into_base(model)
    merged, _ = generate_texts(model, tokenizer, prompts, settings)
    assert merged == unmerged


def test_beam_settings_are_transformers_beam_search(tokenizer, prompts):
    """Beam 10, length penalty 0.9, no repeated 4-gram: the same tokens as calling generate directly."""
    torch.set_num_threads(1)
    model = _dsee_model("gpt2", len(tokenizer))
    settings = DecodingSettings(max_new_tokens=MAX_NEW, batch_size=3)
    assert (settings.num_beams, settings.length_penalty, settings.no_repeat_ngram_size) == (10, 0.9, 4)
    outputs, _ = generate_texts(model, tokenizer, prompts[:3], settings)
    stop_ids = stop_token_ids(tokenizer, True)
    for prompt, output in zip(prompts[:3], outputs):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            num_beams=10,
            length_penalty=0.9,
            no_repeat_ngram_size=4,
            max_new_tokens=MAX_NEW,
            early_stopping=True,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert output == clean_output(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    greedy, _ = generate_texts(model, tokenizer, prompts[:3], settings.greedy())
    assert greedy != outputs


def test_stop_tokens_are_eos_and_every_token_holding_a_newline(tokenizer):
    ids = stop_token_ids(tokenizer, True)
    assert tokenizer.eos_token_id in ids and len(ids) > 1
    assert all("\n" in tokenizer.decode([i]) for i in ids if i != tokenizer.eos_token_id)
    assert stop_token_ids(tokenizer, False) == [tokenizer.eos_token_id]
    assert clean_output(" Blue Spice is a pub.\nname[") == "Blue Spice is a pub."


def test_batches_are_planned_longest_first_and_cover_every_input_once():
    batches = plan_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]


def test_settings_come_from_the_generate_section_and_are_checked():
    from dsee_dist.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["generate.num_beams=4", "generate.max_new_tokens=32"])
    settings = DecodingSettings.from_config(cfg.generate, batch_size=2)
    assert (settings.num_beams, settings.max_new_tokens, settings.batch_size) == (4, 32, 2)
    assert settings.length_penalty == 0.9 and settings.stop_at_newline
    assert settings.greedy().num_beams == 1 and settings.greedy().no_repeat_ngram_size == 0
    with pytest.raises(ConfigError, match="generate.num_beams must be at least 1"):
        DecodingSettings.from_config(cfg.generate, num_beams=0)
