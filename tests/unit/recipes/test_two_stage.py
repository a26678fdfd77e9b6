"""Two-stage requests the model cannot satisfy are refused before stage 1 trains."""

import pytest

from dsee_dist.config import PruneConfig
from dsee_dist.errors import ConfigError, DSEEError
from dsee_dist.recipes.two_stage import check_request
from tests.conftest import tiny_gpt2, tiny_llama


def test_a_base_that_is_not_a_local_directory_is_refused():
    with pytest.raises(DSEEError, match="'openai-community/gpt2' is not a local directory; download it"):
        check_request(PruneConfig(method="unstructured"), "openai-community/gpt2")


def test_a_model_of_an_unknown_family_is_refused_and_llama_passes(tmp_path):
    from transformers import GPTJConfig, GPTJForCausalLM

    GPTJForCausalLM(GPTJConfig(n_layer=1, n_embd=32, n_head=4, rotary_dim=4, vocab_size=97)).save_pretrained(
        tmp_path / "j"
    )
    with pytest.raises(ConfigError, match="pruning needs a known decoder family, and model_type 'gptj' is not one"):
        check_request(PruneConfig(method="unstructured"), str(tmp_path / "j"))
    tiny_llama().save_pretrained(tmp_path / "llama")
    check_request(PruneConfig(method="unstructured"), str(tmp_path / "llama"))
    check_request(PruneConfig(method="structured", heads_removed=2, mlp_ratio=0.25), str(tmp_path / "llama"))


def test_a_valid_request_passes(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    check_request(PruneConfig(method="structured", heads_removed=3), str(tmp_path))
    with pytest.raises(ConfigError, match="removing 4 heads"):
        check_request(PruneConfig(method="structured", heads_removed=4), str(tmp_path))
