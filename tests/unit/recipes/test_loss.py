"""The chunked cross-entropy (dsee_dist/recipes/loss.py) against the plain one: same loss, same gradients of
every parameter (the tied head included) and of a head with a bias, no whole-batch fp32 logits alive at once, and
the head called once per micro-batch (what keeps ZeRO-3's gathers the same on every rank)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dsee_dist.recipes.loss import IGNORE_INDEX, linear_cross_entropy, token_loss_sum


def tiny(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_layer=2,
                n_embd=32,
                n_head=4,
                vocab_size=500,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                vocab_size=500,
                max_position_embeddings=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    model.config.use_cache = False
    return model.double().train()


def batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :5] = IGNORE_INDEX  # a prompt without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_loss_and_gradients_equal_plain(family, chunk):
    model = tiny(family)
    data = batch(model.config.vocab_size)
    results = []
    for chunk_tokens in (0, chunk):
        model.zero_grad()
        loss, count = token_loss_sum(model, data, torch.device("cpu"), chunk_tokens=chunk_tokens)
        loss.backward()
        results.append(
            (loss.detach(), int(count), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (plain, n_plain, g_plain), (chunked, n_chunked, g_chunked) = results
    assert n_plain == n_chunked == int((data["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0.0)  # the loss is summed in fp32
    assert g_plain.keys() == g_chunked.keys() and len(g_plain) > 5
    for name in g_plain:
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def largest_saved_logits(model, data: dict, chunk_tokens: int) -> int:
    """Elements of the largest vocabulary-wide tensor autograd saves in forward."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel() if t.shape and t.shape[-1] == model.config.vocab_size else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = token_loss_sum(model, data, torch.device("cpu"), chunk_tokens=chunk_tokens)
    loss.backward()
    return max(sizes)


def test_chunked_loss_never_holds_whole_batch_logits():
    """The plain loss saves the log-softmax of every position; the chunked one keeps only gradients of the hidden
    states and of the head's weight (vocabulary x hidden, not positions x vocabulary)."""
    model = tiny("gpt2").float()
    data = batch(model.config.vocab_size)
    assert largest_saved_logits(model, data, 0) >= 3 * 19 * model.config.vocab_size
    assert largest_saved_logits(model, data, 8) == 0


@pytest.mark.parametrize("chunk_tokens", [0, 1, 5])
def test_head_runs_once_per_micro_batch(chunk_tokens):
    model = tiny("llama")
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    loss, _ = token_loss_sum(model, batch(model.config.vocab_size), torch.device("cpu"), chunk_tokens=chunk_tokens)
    loss.backward()
    assert len(calls) == 1


@pytest.mark.parametrize("trainable", [True, False])
def test_linear_cross_entropy_with_bias_equals_plain(trainable):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, dtype=torch.double, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True).double().requires_grad_(trainable)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :4] = IGNORE_INDEX
    grads = []
    for loss_of in (
        lambda: torch.nn.functional.cross_entropy(
            head(hidden).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ),
        lambda: linear_cross_entropy(hidden, head.weight, head.bias, labels, 4),
    ):
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        loss = loss_of()
        (2.5 * loss).backward()  # a scaled loss, as the trainer's backward
        grads.append((loss.detach(), hidden.grad, head.weight.grad, head.bias.grad))
    (plain, *plain_grads), (chunked, *chunked_grads) = grads
    torch.testing.assert_close(chunked.double(), plain, rtol=1e-6, atol=0.0)
    assert (plain_grads[1] is None) == (not trainable) == (chunked_grads[1] is None)
    for got, want in zip(chunked_grads, plain_grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
