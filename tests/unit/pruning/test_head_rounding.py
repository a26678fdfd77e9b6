"""`prune.head_rounding`: a Llama with 6 query heads over 3 KV heads asked for 25 % of its heads (1.5 per layer,
0.5 per KV group) removes 0 with `nearest` (the default, as before the key existed) and `down`, 3 (one per
group) with `up`, and the log says requested vs removed and why (heads per KV group)."""

import dataclasses
import json

import pytest

from dsee_dist.config import PruneConfig, config_from_dict
from dsee_dist.dsee.adapter import read_adapter
from dsee_dist.errors import ConfigError
from dsee_dist.pruning.structured import heads_to_remove, prune_structured, round_heads
from tests.unit.models import family_models
from tests.unit.models.family_models import SINGLE, stage1

LLAMA_6Q_3KV = (
    "LlamaConfig",
    dict(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=64,
    ),
)


@pytest.fixture
def llama_6q_3kv(tmp_path, monkeypatch):
    monkeypatch.setitem(family_models.FAMILY_CONFIGS, "llama_6q_3kv", LLAMA_6Q_3KV)
    base_dir, adapter_dir, _, _ = stage1(tmp_path, "llama_6q_3kv")
    return base_dir, read_adapter(adapter_dir)


@pytest.mark.parametrize(("rounding", "removed"), [("nearest", 0), ("down", 0), ("up", 3)])
def test_rounding_of_a_quarter_of_six_heads_over_three_kv_groups(tmp_path, llama_6q_3kv, rounding, removed):
    base_dir, adapter = llama_6q_3kv
    logged = []
    cfg = PruneConfig(method="structured", head_ratio=0.25, mlp_ratio=0.25, head_rounding=rounding)
    report = prune_structured(cfg, str(base_dir), adapter, tmp_path / "pruned", SINGLE, log=logged.append)
    assert report["heads_per_layer"] == [6 - removed] * 2 and report["kv_heads_per_layer"] == [3, 3]
    for heads in report["plan"]["heads_removed"]:
        assert sorted(h // 2 for h in heads) == list(range(removed))  # one from each KV group, or none
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (6 - removed, 3)
    (line,) = [line for line in logged if line.startswith("prune: heads:")]
    assert f"asks for 1.5; removing {removed} " in line
    assert "3 KV groups of 2 query heads" in line and f"0.5 per group, rounded {rounding} to {removed // 3}" in line
    others = {"nearest": 0, "down": 0, "up": 3}
    assert all(f"{how}: {count}" in line for how, count in others.items() if how != rounding)


def test_rounding_without_gqa_and_float_error():
    cfg = PruneConfig(method="structured", head_ratio=0.25)
    assert [heads_to_remove(dataclasses.replace(cfg, head_rounding=how), 6) for how in ("nearest", "down", "up")] == [
        2,
        1,
        2,
    ]
    assert round_heads(0.3 * 10, "up") == 3 and round_heads(0.7 * 10, "down") == 7  # 3.0000000000000004, 6.99..
    assert round_heads(2.5, "nearest") == 2 and round_heads(3.5, "nearest") == 4  # Python's round, as before


def test_up_that_leaves_no_head_in_a_group_is_refused(llama_6q_3kv, tmp_path):
    base_dir, adapter = llama_6q_3kv
    cfg = PruneConfig(method="structured", head_ratio=0.6, head_rounding="up")  # 1.2 of 2 per group -> 2
    with pytest.raises(ConfigError, match="leaves none"):
        prune_structured(cfg, str(base_dir), adapter, tmp_path / "pruned", SINGLE, log=lambda m: None)


def test_an_unknown_rounding_is_refused():
    data = {
        "model": {"builtin": "gpt2-tiny"},
        "train": {"max_steps": 1},
        "prune": {"method": "structured", "head_ratio": 0.25, "head_rounding": "ceil", "retrain_steps": 1},
    }
    with pytest.raises(
        ConfigError, match="prune.head_rounding 'ceil' is not supported; choose one of: nearest, down, up"
    ):
        config_from_dict(data)


def test_a_request_that_rounds_to_nothing_is_refused_before_any_work(llama_6q_3kv, tmp_path):
    base_dir, adapter = llama_6q_3kv
    cfg = PruneConfig(method="structured", head_ratio=0.25)  # 0.5 per KV group rounds to 0, no MLP ratio
    with pytest.raises(ConfigError, match=r"would remove nothing .*asks for 1.5; removing 0 .*head_rounding=up$"):
        prune_structured(cfg, str(base_dir), adapter, tmp_path / "pruned", SINGLE, log=lambda m: None)
    assert not (tmp_path / "pruned").exists()
