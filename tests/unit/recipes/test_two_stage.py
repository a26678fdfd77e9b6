"""Two-stage requests the model cannot satisfy are refused before stage 1 trains."""

import pytest

from dsee_dist.config import PruneConfig
from dsee_dist.errors import ConfigError, DSEEError
from dsee_dist.recipes.two_stage import check_request
from tests.conftest import tiny_gpt2, tiny_llama


def test_a_base_that_is_not_a_local_directory_is_refused():
    with pytest.raises(DSEEError, match="'openai-community/gpt2' is not a local directory; download it"):
        check_request(PruneConfig(method="unstructured"), "openai-community/gpt2")


def test_a_non_gpt2_model_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="pruning supports GPT-2-style models"):
        check_request(PruneConfig(method="unstructured"), str(tmp_path))


def test_a_valid_request_passes(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    check_request(PruneConfig(method="structured", heads_removed=3), str(tmp_path))
    with pytest.raises(ConfigError, match="removing 4 heads"):
        check_request(PruneConfig(method="structured", heads_removed=4), str(tmp_path))
