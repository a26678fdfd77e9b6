"""bench/quality.py end to end on tiny random models: train (the project's trainer) -> export -> decode ->
score -> table row, and a rerun that skips finished rows."""

import csv
import json
import shutil
from types import SimpleNamespace

import pytest
import yaml

from bench import quality
from bench._quality_rows import ROWS, row_config, sparse_budget
from tests.bench.conftest import SAMPLE


def _small_train_csv(tmp_path, n: int = 48):
    with open(SAMPLE / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    path = tmp_path / "train.csv"
    quality.write_pairs(path, [(r["mr"], r["ref"]) for r in rows])
    return path


@pytest.fixture(autouse=True)
def _no_java(monkeypatch):
    """Scoring without Java (METEOR reported unavailable): the JVM start costs ~30 s on 2 cores; the METEOR
    path itself is checked against the official figures in tests/unit/eval."""
    import dsee_dist.eval.metrics as metrics

    monkeypatch.setattr(metrics, "find_java", lambda: None)


def _args(model, train_csv, results, rows, *extra, max_steps: int = 3) -> list[str]:
    return [
        *extra,
        "--model",
        str(model),
        "--train-csv",
        str(train_csv),
        "--test-csv",
        str(SAMPLE / "test.csv"),
        "--results",
        str(results),
        "--rows",
        rows,
        "--max-test-mrs",
        "5",
        "--max-steps",
        str(max_steps),
        "--no-grid",
        "--seeds",
        "1",
        "--device",
        "cpu",
        "--micro-batch-size",
        "4",
        "--grad-accum-steps",
        "1",
        "--max-new-tokens",
        "12",
    ]


def _run(model, train_csv, results, rows, capsys, *extra):
    quality.main(_args(model, train_csv, results, rows, *extra))
    return capsys.readouterr().out


def test_split_by_mr_never_splits_an_mr():
    pairs = [(f"mr{i % 30}", f"ref{i}") for i in range(200)]
    train, held = quality.split_by_mr(pairs, 0.1, seed=0)
    assert len(train) + len(held) == 200
    assert {m for m, _ in train}.isdisjoint({m for m, _ in held}) and len({m for m, _ in held}) == 3
    assert quality.split_by_mr(pairs, 0.1, seed=0) == (train, held)


def test_sparse_budget_is_within_five_percent_of_lora():
    smollm2 = [(576, 576), (192, 576)] * 30  # q_proj, v_proj of SmolLM2-135M's 30 layers
    budget = sparse_budget(smollm2, rank=8)
    assert budget["lora_params"] == 30 * 8 * (1152 + 768) and budget["num_sparse"] == 384
    assert 1.0 < budget["ratio"] <= 1.05 and sparse_budget(smollm2, 8, 0.049)["num_sparse"] < 384


def test_llama_pipeline_rows_and_resume(tiny_models, tmp_path, capsys):
    results = tmp_path / "results"
    train_csv = _small_train_csv(tmp_path)
    out = _run(tiny_models["llama"], train_csv, results, "base,dsee", capsys)
    report = json.loads((results / "quality.json").read_text())
    by_row = {r["row"]: r for r in report["records"]}
    assert set(by_row) == {"base", "dsee"}
    budget = report["sparse_budget"]
    assert by_row["dsee"]["trainable_params"] == budget["dsee_params"] and by_row["base"]["trainable_params"] == 0
    for name, rec in by_row.items():
        outputs = (results / "rows" / f"{name}-s42" / "outputs.txt").read_text().splitlines()
        assert len(outputs) == 5 and all(outputs)
        assert rec["decoding"] == "greedy" and rec["test_mrs"] == 5 and rec["flops_per_token"] > 0
        assert set(rec["scores"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
        assert 0.0 <= rec["scores"]["BLEU"] <= 1.0 and rec["scores"]["ROUGE_L"] is not None and rec["versions"]["torch"]
        assert rec["scores"] == quality.score(outputs, quality.test_set(str(SAMPLE / "test.csv"), 5)[1])
    dsee = by_row["dsee"]
    assert dsee["train_wall_s"] > 0 and dsee["train_cpu_s"] > 0 and dsee["peak_rss_mb"] > 0
    table = (results / "table.md").read_text()
    assert "| base |" in table and "| dsee |" in table and "Decoding: greedy" in table
    assert (results / "quality.png").stat().st_size > 1000
    assert all(v > 0 for v in report["speed"]["tokens_per_s"].values())

    # Rerun with more rows: the finished ones are skipped (their records untouched), the new ones run. dsee's
    # exported model is deleted first (a table finished on another machine): its speed comes from its config.
    before = {p: p.stat().st_mtime_ns for p in results.glob("rows/*/row.json")}
    shutil.rmtree(by_row["dsee"]["model_dir"])
    out = _run(tiny_models["llama"], train_csv, results, "base,dsee,lora,full,dsee-2x", capsys)
    assert "row base seed 42: finished earlier, skipped" in out and "row dsee seed 42: finished earlier, skipped" in out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    report = json.loads((results / "quality.json").read_text())
    by_row = {r["row"]: r for r in report["records"]}
    assert set(by_row) == {"base", "dsee", "lora", "full", "dsee-2x"}
    assert by_row["lora"]["trainable_params"] == budget["lora_params"]
    # the control trains dsee for twice the steps (as many as a pruned row's two stages)
    assert by_row["dsee-2x"]["steps"] == 2 * by_row["dsee"]["steps"] == 6
    assert by_row["dsee-2x"]["trainable_params"] == budget["dsee_params"]
    last = (results / "rows" / "dsee-2x-s42" / "run" / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["step"] == 6
    from transformers import AutoModelForCausalLM

    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).parameters())
    assert by_row["full"]["trainable_params"] == total
    assert "| lora |" in (results / "table.md").read_text()
    speeds = report["speed"]["tokens_per_s"]
    assert set(speeds) == {"base-s42", "dsee-s42", "lora-s42", "full-s42", "dsee-2x-s42"}
    assert all(v > 0 for v in speeds.values())

    # --report-only trains nothing (dsee-s25 stays unfinished) and rebuilds the report from the finished rows.
    out = _run(tiny_models["llama"], train_csv, results, "base,dsee,dsee-s25", capsys, "--report-only")
    assert not (results / "rows" / "dsee-s25-s42").exists() and "training" not in out
    report = json.loads((results / "quality.json").read_text())
    assert {r["row"] for r in report["records"]} == {"base", "dsee", "lora", "full", "dsee-2x"}


def test_a_stopped_row_checkpoints_and_the_rerun_resumes_it(tiny_models, tmp_path, capsys):
    """SIGTERM to the table mid-training: the trainer checkpoints, the table exits 75 having recorded the
    attempt; a request that finds the trainer finishing stops the table after it; the rerun continues the
    training from its last checkpoint and the row counts every attempt."""
    import os
    import signal
    import threading
    import time

    results = tmp_path / "results"
    run_dir = results / "rows" / "dsee-s42" / "run"
    train_csv = _small_train_csv(tmp_path)

    def trained_steps() -> bool:
        metrics = run_dir / "metrics.jsonl"
        return metrics.is_file() and '"loss"' in metrics.read_text()

    def stop_once_it_trains():  # after the first logged loss (step 10 of 30)
        deadline = time.time() + 120
        while time.time() < deadline and not trained_steps():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_once_it_trains)
    stopper.start()
    code = quality.main(_args(tiny_models["llama"], train_csv, results, "dsee", max_steps=30))
    stopper.join()
    out = capsys.readouterr().out
    assert code == 75 and "checkpointed and stopped; rerun the same command to resume" in out, out
    assert not (results / "rows" / "dsee-s42" / "row.json").exists()
    (stopped,) = json.loads((run_dir / quality.ATTEMPTS_FILE).read_text())
    assert stopped["exit"] == 75 and stopped["wall_s"] > 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the table's handler is gone after main

    # A request that comes as the trainer finishes its last step: the trainer ends normally, the table stops
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    with quality.STOP, pytest.raises(quality.Stopped, match="finished as the stop request came"):
        quality.STOP.requested = True
        quality.run_training(config, run_dir, "cpu")
    assert [a["exit"] for a in json.loads((run_dir / quality.ATTEMPTS_FILE).read_text())] == [75, 0]
    assert not (results / "rows" / "dsee-s42" / "row.json").exists()

    assert quality.main(_args(tiny_models["llama"], train_csv, results, "dsee", max_steps=30)) == 0
    log = (run_dir / "train.log").read_text()
    resumed = [int(part.split()[0]) for part in log.split("resume: continuing from step ")[1:]]
    assert len(resumed) == 2 and 10 <= resumed[0] < 30 and resumed[1] == 30
    record = json.loads((results / "rows" / "dsee-s42" / "row.json").read_text())
    assert record["steps"] == 30 and record["train_attempts"] == 3
    assert record["train_wall_s"] > stopped["wall_s"] and record["train_cpu_s"] > stopped["cpu_s"]
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 30


def test_every_row_runs_once_before_the_extra_seeds():
    settings = quality.Settings(
        model="m", train_csv="t", test_csv="t", results="r", rows=["base", "dsee", "full", "lora"], seeds=[42, 43, 44]
    )
    planned = quality.Bench.planned(SimpleNamespace(s=settings))
    assert planned[:4] == [("base", 42), ("dsee", 42), ("full", 42), ("lora", 42)]
    assert planned[4:] == [("dsee", 43), ("lora", 43), ("dsee", 44), ("lora", 44)]


def test_the_twice_as_long_control_differs_from_dsee_only_in_its_steps():
    kw = dict(
        model_dir="m", train_csv="t", eval_csv="e", out_dir="o", seed=42, lr=2e-3, num_sparse=4,
        model_type="llama", gpu=False,
        budget={"micro_batch_size": 4, "grad_accum_steps": 4, "max_steps": 292, "warmup_steps": 29},
    )  # fmt: skip
    dsee, control = row_config(ROWS["dsee"], **kw), row_config(ROWS["dsee-2x"], **kw)
    assert (control["train"]["max_steps"], control["train"]["warmup_steps"]) == (584, 58)
    # a pruned row trains stage 1 plus as many re-tuning steps: the control's total
    pruned = row_config(ROWS["dsee-s25"], **kw)
    assert control["train"]["max_steps"] == pruned["train"]["max_steps"] + pruned["prune"]["retrain_steps"]
    for cfg in (dsee, control):
        del cfg["train"]["max_steps"], cfg["train"]["warmup_steps"]
    assert control == dsee and kw["budget"]["max_steps"] == 292


def test_gpt2_pipeline_dsee_row(tiny_models, tmp_path, capsys):
    results = tmp_path / "results"
    _run(tiny_models["gpt2"], _small_train_csv(tmp_path), results, "dsee", capsys)
    (rec,) = json.loads((results / "quality.json").read_text())["records"]
    assert rec["row"] == "dsee" and rec["trainable_params"] > 0 and rec["scores"]["BLEU"] is not None
    assert len((results / "rows" / "dsee-s42" / "outputs.txt").read_text().splitlines()) == 5


def test_pruning_rows_take_a_finished_copy_of_the_dsee_training_as_their_stage_1(tiny_models, tmp_path, capsys):
    results = tmp_path / "results"
    out = _run(tiny_models["llama"], _small_train_csv(tmp_path), results, "dsee,dsee-u50", capsys)
    assert "(stage 1 is dsee-s42's finished run)" in out
    by_row = {r["row"]: r for r in json.loads((results / "quality.json").read_text())["records"]}
    dsee, pruned = by_row["dsee"], by_row["dsee-u50"]
    assert pruned["stage1_from"] == "dsee-s42" and pruned["trainable_params"] == dsee["trainable_params"]
    assert pruned["train_wall_s"] > dsee["train_wall_s"]  # stage 1's time is counted in the row
    run = results / "rows" / "dsee-u50-s42" / "run"
    log = (run / "train.log").read_text()
    assert "stage 1 of 2" not in log and "stage 2 of 2" in log  # stage 1 was not trained again
    same = results / "rows" / "dsee-s42" / "run" / "adapter" / "adapter_model.safetensors"
    assert (run / "stage1" / "adapter" / "adapter_model.safetensors").read_bytes() == same.read_bytes()
    assert pruned["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.02)  # the export is half zeros
    # the table counts the FLOPs of the nonzero weights beside the dense figure (2 per zero weight fewer)
    (entry,) = [e for e in json.loads((results / "quality.json").read_text())["rows"] if e["row"] == "dsee-u50"]
    assert entry["nonzero_flops_per_token"] == pruned["flops_per_token"] - 2 * pruned["sparsity"]["zeros"]
    assert f"({entry['nonzero_flops_per_token'] / 1e6:.1f} nonzero)" in (results / "table.md").read_text()
    # with the dsee row's run gone, the next pruning row of the seed takes dsee-u50's finished stage 1
    stage1_bytes = same.read_bytes()
    shutil.rmtree(results / "rows" / "dsee-s42" / "run")
    out = _run(tiny_models["llama"], _small_train_csv(tmp_path), results, "dsee,dsee-u50,dsee-s25", capsys)
    assert "(stage 1 is dsee-u50-s42's finished stage 1)" in out
    structured = json.loads((results / "rows" / "dsee-s25-s42" / "row.json").read_text())
    assert structured["stage1_from"] == "dsee-u50-s42" and structured["train_wall_s"] > dsee["train_wall_s"]
    run25 = results / "rows" / "dsee-s25-s42" / "run"
    assert "stage 1 of 2" not in (run25 / "train.log").read_text()
    assert (run25 / "stage1" / "adapter" / "adapter_model.safetensors").read_bytes() == stage1_bytes


def test_decoding_time_leaves_out_the_seconds_the_table_was_paused(tmp_path, monkeypatch):
    """bench/pause_quality.py adds a pause to the results directory's count while the table decodes: the
    row's decode_s (and so its tokens/s) is the time spent decoding, not the time the table was stopped."""
    import bench._quality_decode as quality_decode

    def decode_while_paused_for_7_5_s(model, tokenizer, mrs, decoding, batch_size, max_new_tokens=64, prompt="e2e"):
        (tmp_path / quality.PAUSED_FILE).write_text("10.0\n")  # 2.5 s from an earlier pause, 7.5 s now
        return [f"out {mr}" for mr in mrs], {"decode_s": 20.0, "new_tokens": 40}

    monkeypatch.setattr(quality_decode, "load_decoder", lambda *a: (object(), object()))
    monkeypatch.setattr(quality_decode, "decode_mrs", decode_while_paused_for_7_5_s)
    bench = object.__new__(quality.Bench)
    bench.root, bench.mrs = tmp_path, ["a", "b"]
    bench.s = SimpleNamespace(device="cpu", decoding="greedy", decode_batch_size=2, max_new_tokens=8)
    (tmp_path / quality.PAUSED_FILE).write_text("2.5\n")
    outputs, timing = bench.decode(tmp_path / "model")
    assert outputs == ["out a", "out b"] and timing == {"decode_s": 12.5, "new_tokens": 40}


def test_the_magnitude_row_differs_from_dsee_only_in_its_support():
    kw = dict(
        model_dir="m", train_csv="t", eval_csv="e", out_dir="o", seed=42, lr=2e-3, num_sparse=4,
        model_type="llama", gpu=False,
        budget={"micro_batch_size": 4, "grad_accum_steps": 4, "max_steps": 292, "warmup_steps": 29},
    )  # fmt: skip
    dsee, mag = row_config(ROWS["dsee"], **kw), row_config(ROWS["dsee-mag"], **kw)
    assert (dsee["dsee"]["support"], mag["dsee"]["support"]) == ("decomposition", "magnitude")
    mag["dsee"]["support"] = "decomposition"
    assert mag == dsee and ROWS["dsee-mag"].multi_seed and ROWS["dsee-mag"].lr_from == "dsee-wide"


def test_the_dsee_rows_beside_supra_are_offered_supra_s_top_learning_rate_on_dsee_s_own_grid_points(
    tmp_path, monkeypatch
):
    """dsee-wide is dsee's config on dsee's grid plus supra's top point; its grid reads the points dsee's grid
    trained (grid/dsee-lr*) and trains only the one that is missing, there; dsee keeps its own three."""
    from bench._quality_rows import LR_GRID

    kw = _row_kw("m", 4)
    assert row_config(ROWS["dsee-wide"], **kw) == row_config(ROWS["dsee"], **kw)
    assert LR_GRID["dsee-wide"] == LR_GRID["dsee"] + [max(LR_GRID["supra"])] and ROWS["dsee-wide"].multi_seed
    losses = dict(zip(LR_GRID["dsee"], [1.6, 1.5, 1.4]))
    for lr, loss in losses.items():
        quality.write_json(tmp_path / "grid" / f"dsee-lr{lr:g}" / "grid.json", {"heldout_loss": loss})
    trained = []

    def train_one_point(config, run_dir, device):
        trained.append((config["method"], config["train"]["lr"], run_dir.parent.name))
        return {"train_wall_s": 1.0}

    monkeypatch.setattr(quality, "run_training", train_one_point)
    monkeypatch.setattr(quality, "final_eval_loss", lambda run_dir: 1.3)
    bench = object.__new__(quality.Bench)
    bench.root, bench.s = tmp_path, SimpleNamespace(grid=True, grid_fraction=1 / 3, device="cpu")
    bench.paths = {"train90": tmp_path / "t.csv", "heldout10": tmp_path / "h.csv"}
    bench.config_for = lambda row, *, lr, **kw: row_config(row, **{**_row_kw("m", 4), "lr": lr})
    assert bench.learning_rate("dsee")["lr"] == 2e-3 and trained == []
    wide = bench.learning_rate("dsee-wide")
    assert trained == [("dsee", 4e-3, "dsee-lr0.004")] and wide["lr"] == 4e-3
    assert wide["heldout_losses"] == {"0.0005": 1.6, "0.001": 1.5, "0.002": 1.4, "0.004": 1.3}


def _row_kw(model_dir: str, num_sparse: int) -> dict:
    return dict(
        model_dir=model_dir, train_csv="t", eval_csv="e", out_dir="o", seed=42, lr=2e-3, num_sparse=num_sparse,
        model_type="llama", gpu=False,
        budget={"micro_batch_size": 4, "grad_accum_steps": 4, "max_steps": 292, "warmup_steps": 29},
    )  # fmt: skip


@pytest.mark.parametrize("name", ["supra", "shira"])
def test_the_peft_sparse_rows_differ_from_lora_only_in_their_method_and_grid(name):
    from bench._quality_rows import DEFAULT_LR, LR_GRID, SEEDS

    lora, row = row_config(ROWS["lora"], **_row_kw("m", 384)), row_config(ROWS[name], **_row_kw("m", 384))
    assert row["method"] == name
    row["method"] = "lora"
    assert row == lora  # same data, order, budget, schedule, targets, rank and alpha
    assert ROWS[name].multi_seed and ROWS[name].lr_from == name and SEEDS == (42, 43, 44)
    grid = LR_GRID[name]
    assert len(grid) == 3 and grid == sorted(grid) and grid[0] < DEFAULT_LR[name] < grid[-1]


def test_the_peft_sparse_rows_train_their_budgets():
    """On SmolLM2-135M's shapes: supra trains exactly dsee's count (LoRA r=8 + 384 x 60 sparse entries, split
    by matrix size), shira exactly lora's."""
    from dsee_dist.recipes import methods

    smollm2 = [(576, 576), (192, 576)] * 30
    budget = sparse_budget(smollm2, rank=8)
    supra = methods.supra_budget([r * c for r, c in smollm2], budget["num_sparse"] * budget["matrices"])
    assert supra["total"] == 384 * 60 and supra["counts"][:2] == [576, 192]
    assert budget["lora_params"] + supra["total"] == budget["dsee_params"]


def test_the_peft_sparse_rows_configs_build_their_budgets_on_a_model(tiny_models):
    from transformers import AutoModelForCausalLM

    from bench._quality_rows import adapted_shapes
    from dsee_dist.config import config_from_dict
    from dsee_dist.recipes import methods

    model_dir = str(tiny_models["llama"])
    shapes = adapted_shapes(model_dir)
    budget = sparse_budget(shapes, rank=8)

    def trainable(name):
        cfg = config_from_dict(row_config(ROWS[name], **_row_kw(model_dir, budget["num_sparse"])), validate=False)
        _, params = methods.prepare_trainable(cfg, AutoModelForCausalLM.from_pretrained(model_dir))
        return sum(p.numel() for p in params)

    supra = methods.supra_budget([r * c for r, c in shapes], budget["num_sparse"] * len(shapes))
    assert trainable("shira") == trainable("lora") == budget["lora_params"]
    assert trainable("supra") == budget["lora_params"] + supra["total"]
    assert abs(supra["total"] - budget["num_sparse"] * len(shapes)) <= 0.03 * budget["num_sparse"] * len(shapes)


def test_the_chat_row_differs_from_dsee_only_in_its_data_format():
    dsee, chat = row_config(ROWS["dsee"], **_row_kw("m", 384)), row_config(ROWS["dsee-chat"], **_row_kw("m", 384))
    assert chat["data"] == {
        **dsee["data"],
        "format": "chat",
        "train_path": "t.chat.jsonl",
        "eval_path": "e.chat.jsonl",
        "block_size": 192,
    }
    chat["data"] = dsee["data"]
    assert chat == dsee and ROWS["dsee-chat"].lr_from == "dsee" and ROWS["base-chat"].method is None


def test_chat_rows_train_on_conversations_and_decode_with_the_chat_template(tiny_models, tmp_path, capsys):
    from transformers import AutoTokenizer

    from dsee_dist.data.encoding import e2e_chat_messages
    from dsee_dist.recipes.generate import e2e_prompts

    results = tmp_path / "results"
    _run(tiny_models["llama"], _small_train_csv(tmp_path), results, "base-chat,dsee-chat", capsys)
    by_row = {r["row"]: r for r in json.loads((results / "quality.json").read_text())["records"]}
    assert by_row["base-chat"]["prompt"] == by_row["dsee-chat"]["prompt"] == "chat"
    assert (
        by_row["dsee-chat"]["trainable_params"]
        == json.loads((results / "quality.json").read_text())["sparse_budget"]["dsee_params"]
    )
    run_config = yaml.safe_load((results / "rows" / "dsee-chat-s42" / "run" / "config.resolved.yaml").read_text())
    assert run_config["data"]["format"] == "chat" and run_config["data"]["train_path"].endswith(".chat.jsonl")
    first = json.loads((results / "data" / "train_all.chat.jsonl").read_text().splitlines()[0])
    with open(results / "data" / "train_all.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert first == {"messages": e2e_chat_messages(row["mr"], row["ref"])}
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    (prompt,) = e2e_prompts(tokenizer, ["name[Aromi]"], chat=True)
    assert (
        prompt == "<|im_start|>user\nWrite one sentence describing this restaurant: name[Aromi]<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert len((results / "rows" / "base-chat-s42" / "outputs.txt").read_text().splitlines()) == 5
