"""bench/pruning_ppl.py's tuned rows: LoRA recovery is the two-stage recipe without stage 1 and with no sparse
part, DSEE's row is tune-prune-retune, both under the project's config validation with the same pruning, learning
rate and stage-2 length; a smoke run on a tiny Llama trains, prunes and scores a LoRA-recovery row end to end."""

import argparse
import json

from bench import pruning_ppl
from dsee_dist.config import config_from_dict
from tests.bench.conftest import _sample_texts


def _args(model, valid, **kw) -> argparse.Namespace:
    settings = dict(model=str(model), valid=str(valid), seq_len=64, lr=1e-3, micro_batch_size=2, grad_accum_steps=2)
    return argparse.Namespace(**{**settings, "tune_steps": 0, **kw})


def test_each_pattern_has_a_lora_recovery_and_a_dsee_row_with_the_same_pruning_and_stage_2(tiny_models, tmp_path):
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(_sample_texts()))
    args = _args(tiny_models["llama"], valid)
    for pattern in ("u50", "2:4", "s25"):
        lora, dsee = (
            config_from_dict(pruning_ppl.tuned_config(f"{pattern}-{m}", args, tmp_path / m, 16))  # validates
            for m in ("lora-recovery", "dsee")
        )
        assert not lora.prune.tune_first and lora.dsee.num_sparse == 0  # LoRA on the pruned pretrained weights
        assert dsee.prune.tune_first and dsee.dsee.num_sparse > 0  # DSEE: stage 1 first, with a sparse part
        for key, value in pruning_ppl.ROWS[f"{pattern}-wanda"].items():  # the untuned Wanda row's pruning
            assert getattr(lora.prune, key) == getattr(dsee.prune, key) == value, (pattern, key)
        assert lora.prune.retrain_epochs == dsee.prune.retrain_epochs == 1.0  # the same stage-2 token budget
        assert lora.prune.retrain_lr == dsee.prune.retrain_lr == lora.train.lr == dsee.train.lr
        assert lora.data.format == "text" and lora.data.block_size == 64


def test_a_lora_recovery_row_prunes_tunes_and_scores_a_tiny_llama(tiny_models, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(_sample_texts()))
    model = tiny_models["llama"]
    argv = ["--model", str(model), "--test", str(text), "--valid", str(text), "--out", str(tmp_path / "out")]
    argv += ["--seq-len", "64", "--max-windows", "3", "--tune-steps", "2", "--calibration-windows", "8"]
    assert pruning_ppl.main([*argv, "--rows", "dense,u50-lora-recovery"]) == 0
    rows = tmp_path / "out" / "smoke" / "rows"
    dense = json.loads((rows / "dense.json").read_text())
    row = json.loads((rows / "u50-lora-recovery.json").read_text())
    # LoRA r 8 on q_proj (32 -> 32) and v_proj (32 -> 16, 2 KV heads) of 2 layers: 8 x (64 + 48) x 2
    assert row["trainable_params"] == 1792 and row["smoke"]
    assert row["train_tokens"] == {"stage2": 2 * 2 * 2 * 64}  # no stage 1; 2 steps of 2 x 2 blocks of 64
    assert row["nonzero_block_weights"] == row["block_weights"] // 2  # every row half pruned, kept so by training
    assert dense["nonzero_block_weights"] == dense["block_weights"]
    assert row["perplexity"] != dense["perplexity"] and row["windows"] == dense["windows"] == 3
    run = tmp_path / "out" / "smoke" / "runs" / "u50-lora-recovery"
    assert not (run / "stage1").exists() and (run / "final" / "config.json").is_file()
    table = (tmp_path / "out" / "smoke" / "table.md").read_text()
    assert "| u50-lora-recovery (smoke) |" in table and "| s25-dsee | not run |" in table
