"""Config loading, overrides, validation, and the CLI's one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsee_dist.config import load_config, resolve_extends
from dsee_dist.errors import ConfigError
from tests.conftest import REPO

CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path, tmp_path):
    # Recipes point at user data (E2E CSVs); where that file is absent, stand in a generated one so the
    # rest of the config is still validated.
    from dsee_dist.data.synthetic_e2e import generate_examples, write_csv

    raw = resolve_extends(path, yaml.safe_load(path.read_text()))  # a recipe may inherit its data paths
    overrides = []
    for key in ("train_path", "eval_path"):
        value = raw.get("data", {}).get(key)
        if value and not (REPO / value).exists() and not Path(value).exists():
            write_csv(generate_examples(4, 0), tmp_path / f"{key}.csv")
            overrides.append(f"data.{key}={tmp_path / f'{key}.csv'}")
    cfg = load_config(path, overrides)
    assert cfg.deepspeed.config


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        REPO / "configs/quickstart.yaml",
        ["train.max_steps=7", "dsee.target_modules=c_attn,c_proj", "ds.zero_optimization.stage=2", "train.lr=1e-3"],
    )
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-3
    assert cfg.dsee.target_modules == ["c_attn", "c_proj"]
    assert cfg.deepspeed.overrides == {"zero_optimization": {"stage": 2}}


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
        ("dsee.lora_rank=0", "dsee.lora_rank must be >= 1"),
        ("dsee.num_sparse=-1", "dsee.num_sparse must be >= 0"),
        ("dsee.support=svd", "dsee.support 'svd'"),
        ("dsee.fused_slices=[q,x]", "dsee.fused_slices"),
        ("train.lr=fast", "train.lr' must be a number"),
        ("model.path=/nonexistent/model", "model.path '/nonexistent/model' does not exist"),
        ("deepspeed.config=configs/ds/zero9.json", "deepspeed.config 'configs/ds/zero9.json' does not exist"),
        ("train.epochs=2", "exactly one of train.max_steps or train.epochs"),
        ("checkpoint.keep_best=bleu", "checkpoint.keep_best=bleu needs eval.generate_every_n_steps > 0"),
        ("generate.num_beams=0", "generate.num_beams must be at least 1"),
        ("train.loss_chunk_tokens=-4", "train.loss_chunk_tokens must be >= 0"),
    ],
)
def test_bad_values_raise_a_config_error_naming_the_key(override, message):
    extra = ["model.builtin=null"] if override.startswith("model.path") else []
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(REPO / "configs/quickstart.yaml", [override, *extra])


def _run_train(tmp_path, *overrides, config=None):
    cmd = [
        sys.executable,
        "-m",
        "dsee_dist.train",
        "--config",
        str(config or REPO / "configs/quickstart.yaml"),
        f"output.dir={tmp_path / 'out'}",
        "model.builtin=gpt2-tiny",
        "data.synthetic_train_examples=64",
        "data.synthetic_eval_examples=8",
        "train.max_steps=1",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["nonsense.key=1"], "unknown config key 'nonsense'"),
        (["data.format=e2e", "data.train_path=/no/such.csv"], "data.train_path '/no/such.csv' does not exist"),
        (["dsee.target_modules=[q_proj]"], "match no adaptable module"),
        (["dsee.lora_rank=65"], "dsee.lora_rank=65 exceeds"),
        (["dsee.num_sparse=5000"], "dsee.num_sparse=5000 is larger than the 64 x 64 matrix"),
    ],
)
def test_cli_bad_config_fails_with_one_clear_line(tmp_path, overrides, message):
    proc = _run_train(tmp_path, *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dsee_dist: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "adapter").exists()


def test_cli_missing_config_file(tmp_path):
    proc = _run_train(tmp_path, config=tmp_path / "missing.yaml")
    assert proc.returncode == 2 and "config file" in proc.stderr and "does not exist" in proc.stderr


def test_cli_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  builtin: gpt2-tiny\n bad indent: [\n")
    proc = _run_train(tmp_path, config=bad)
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["prune.method=unstructured", "prune.ratio=1.0", "prune.retrain_steps=1"],
            "prune.ratio must be a fraction in [0, 1)",
        ),
        (
            ["prune.method=unstructured", "prune.ratio=-0.1", "prune.retrain_steps=1"],
            "prune.ratio must be a fraction in [0, 1)",
        ),
        (
            ["prune.method=unstructured", "prune.modules=[attn_q,ffn]", "prune.retrain_steps=1"],
            "prune.modules: 'ffn' is not supported",
        ),
        (
            ["prune.method=structured", "prune.heads_removed=4", "prune.retrain_steps=1"],
            "removing 4 heads per layer leaves none",
        ),
        (["prune.method=structured", "prune.retrain_steps=1"], "prune.method=structured removes nothing"),
        (["prune.method=unstructured"], "exactly one of prune.retrain_steps or prune.retrain_epochs"),
        (
            [
                "prune.method=unstructured",
                "prune.score=activation",
                "prune.calibration_examples=0",
                "prune.retrain_steps=1",
            ],
            "prune.calibration_examples must be >= 1 for the activation score",
        ),
        (
            [
                "prune.method=structured",
                "prune.mlp_ratio=0.25",
                "prune.head_score=activation",
                "prune.calibration_examples=0",
                "prune.retrain_steps=1",
            ],
            "prune.calibration_examples must be >= 1 for the activation score",
        ),
        (
            [
                "prune.method=unstructured",
                "prune.grouping=row",
                "prune.group_ratios={attn_q: 0.3}",
                "prune.retrain_steps=1",
            ],
            "prune.grouping=row takes group_ratios only for the adaptation groups 'adapted' and 'frozen', got attn_q",
        ),
    ],
)
def test_cli_bad_pruning_requests_fail_before_training(tmp_path, overrides, message):
    proc = _run_train(tmp_path, *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dsee_dist: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "stage 1 of 2" not in proc.stdout and not (tmp_path / "out" / "stage1").exists()


def test_extends_merges_over_the_parent_and_refuses_cycles(tmp_path):
    (tmp_path / "parent.yaml").write_text((REPO / "configs/quickstart.yaml").read_text())
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\ntrain:\n  lr: 0.5\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.lr == 0.5 and cfg.train.max_steps == 150 and cfg.dsee.num_sparse == 64
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="extends 'missing.yaml', which does not exist"):
        load_config(tmp_path / "orphan.yaml")


def test_every_problem_is_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/quickstart.yaml", ["dsee.lora_rank=0", "train.schedule=step", "data.block_size=2"])
    message = str(info.value)
    assert message.startswith("3 problems in the config: ")
    for part in ("dsee.lora_rank must be >= 1", "train.schedule 'step' is not supported", "data.block_size must be"):
        assert part in message
    assert len(info.value.problems) == 3


def test_prune_then_recover_refuses_a_score_that_reads_the_update_it_does_not_have():
    base = ["prune.tune_first=false", "prune.retrain_steps=1"]
    with pytest.raises(
        ConfigError, match=r"no tuned update for prune.score=delta to score; use prune.score=activation"
    ):
        load_config(REPO / "configs/quickstart.yaml", [*base, "prune.method=unstructured"])
    structured = [*base, "prune.method=structured", "prune.mlp_ratio=0.25"]
    with pytest.raises(ConfigError, match=r"no tuned update for prune.head_score=delta\+base to score"):
        load_config(REPO / "configs/quickstart.yaml", [*structured, "prune.head_score=delta+base"])
    # what the pretrained weights can be scored by passes (structured ignores the unstructured score)
    assert not load_config(
        REPO / "configs/quickstart.yaml", [*base, "prune.method=unstructured", "prune.score=base"]
    ).prune.tune_first
    load_config(REPO / "configs/quickstart.yaml", [*structured, "prune.head_score=activation"])
    load_config(REPO / "configs/quickstart.yaml", ["prune.method=unstructured", "prune.retrain_steps=1"])  # tune first


def test_choice_lists_come_from_the_schema_types():
    import typing

    from dsee_dist.config import SUPPORT_METHODS, schema

    assert SUPPORT_METHODS == typing.get_args(schema.SupportMethod)
    hints = typing.get_type_hints(schema.DSEEConfig)
    assert typing.get_args(hints["support"]) == SUPPORT_METHODS
    for section in (schema.ModelConfig, schema.DSEEConfig, schema.TrainConfig, schema.PruneConfig):
        for f in __import__("dataclasses").fields(section):
            assert f.metadata.get("help"), f"{section.__name__}.{f.name} has no help"


def test_config_imports_neither_torch_nor_deepspeed():
    code = "import sys, dsee_dist.config; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == ["False", "False"]


def test_bad_data_fails_with_one_line_and_writes_nothing(tmp_path):
    """The data is read before anything is written (tests/unit/data has every kind of bad data at the loader)."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' * 3 + '{"prompt": "a", "completion": ""}\n')
    message = "train.jsonl, row 4: 'completion' is empty"
    proc = _run_train(tmp_path, "data.format=jsonl", f"data.train_path={path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dsee_dist: error:")]
    assert len(errors) == 1 and message in errors[0] and "train.jsonl" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # not even config.resolved.yaml
