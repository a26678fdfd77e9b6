"""method=supra and method=shira (PEFT's Supertuning with r, and SHiRA) through the real trainer on 2 gloo ranks:
the same losses under ZeRO-0, 2 and 3, the budget's trainable count in the optimizer, the base model's loss
at step 0, a resume that continues the same run, and the ZeRO-3 adapter reloaded by stock PEFT. Beside them,
what stock PEFT does on a ZeRO-3-partitioned model (tests/distributed/peft_zero3_probe.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dsee_dist.config import load_config
from dsee_dist.data import dataset as data
from dsee_dist.models import loading as models
from dsee_dist.recipes.finetune import token_loss_sum
from tests.bench.conftest import SAMPLE, save_tiny_model
from tests.distributed.launch import read_metrics, run_jobs_in_one_launch, run_module, train_losses

pytestmark = pytest.mark.distributed

STAGES = {0: "configs/ds/zero0_fp32.json", 2: "configs/ds/zero2_fp32.json", 3: "configs/ds/zero3_fp32.json"}
RUN = [
    "model.builtin=null",
    "data.format=e2e",
    f"data.train_path={SAMPLE / 'train.csv'}",
    f"data.eval_path={SAMPLE / 'test.csv'}",
    "data.max_train_examples=32",
    "data.max_eval_examples=8",
    "data.block_size=64",
    "dsee.target_modules=[q_proj,v_proj]",
    "dsee.fused_slices=[]",
    "dsee.lora_rank=4",
    "dsee.lora_alpha=8",
    "dsee.num_sparse=24",
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.grad_accum_steps=1",
    "train.lr=1e-2",
    "train.log_every_n_steps=1",
    "train.warmup_steps=0",
    "eval.every_n_steps=0",
    "eval.micro_batch_size=4",
    "ds.zero_optimization.stage3_param_persistence_threshold=0",  # the tiny matrices are partitioned too
]
# The tiny Llama: hidden 32, 4 heads of 8, 2 KV heads -> q_proj 32 x 32, v_proj 16 x 32, 2 layers.
LORA_COUNT = 2 * (4 * (32 + 32) + 4 * (32 + 16))
SPARSE_TOTAL = 2 * 2 * 24  # DSEE's 24 per matrix; Supertuning's one sparsity gives q 32 + v 16 per layer
BUDGET = {"supra": LORA_COUNT + SPARSE_TOTAL, "shira": LORA_COUNT}


@pytest.fixture(scope="module")
def sparse_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_sparse")
    model = save_tiny_model("llama", root / "model")
    jobs = {}
    for method in BUDGET:
        for stage, ds in STAGES.items():
            jobs[f"{method}_zero{stage}"] = (
                root / f"{method}_zero{stage}",
                [f"method={method}", f"model.path={model}", f"deepspeed.config={ds}", *RUN],
            )
    # supra under ZeRO-3 again, stopped after step 2 and resumed by the next job: the same 4 losses
    resumed = root / "supra_zero3_resumed"
    common = ["method=supra", f"model.path={model}", f"deepspeed.config={STAGES[3]}", *RUN, "checkpoint.every=2"]
    jobs["supra_zero3_stopped"] = (resumed, [*common, "train.stop_after_steps=2"])
    jobs["supra_zero3_resume"] = (resumed, [*common, "resume=auto"])
    outputs = run_jobs_in_one_launch(2, jobs)
    return model, {name: out for name, (out, _) in jobs.items()}, outputs


@pytest.mark.parametrize("method", list(BUDGET))
def test_losses_agree_across_zero_stages(sparse_runs, method):
    _, runs, _ = sparse_runs
    reference = train_losses(runs[f"{method}_zero2"])
    assert len(reference) == 4 and reference[-1] < reference[0]  # it learns
    for stage in STAGES:
        losses = train_losses(runs[f"{method}_zero{stage}"])
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=1e-6, msg=f"{method} ZeRO-{stage}"
        )


@pytest.mark.parametrize("method", list(BUDGET))
def test_optimizer_holds_the_budgets_trainable_count_at_every_stage(sparse_runs, method):
    _, runs, outputs = sparse_runs

    def state(stage):
        metrics = read_metrics(runs[f"{method}_zero{stage}"])
        return next(r["optimizer_state_numel"] for r in metrics if "optimizer_state_numel" in r)

    budget = BUDGET[method]
    assert state(0) == 2 * budget  # replicated on both ranks
    for stage in (2, 3):  # partitioned: one copy over both ranks (plus alignment padding)
        assert budget <= state(stage) <= budget + 64, stage
    for stage in STAGES:
        assert f"trainable params: {budget:,} " in outputs[f"{method}_zero{stage}"], stage


def _first_step_base_loss(out_dir, model_dir):
    """Step 1's loss computed with plain transformers on the base model (no DeepSpeed, no adapters)."""
    cfg = load_config(out_dir / "config.resolved.yaml")
    tokenizer = models.load_tokenizer(model_dir)
    train_split, _ = data.load_splits(cfg, tokenizer, out_dir)
    schedule = data.GlobalBatchSchedule(len(train_split), 8, 1, 0, 1, cfg.train.seed)
    base = models.load_model(model_dir).eval()
    (indices,) = schedule.micro_batches(0)
    with torch.no_grad():
        loss, n = token_loss_sum(base, data.collate(train_split, indices, tokenizer.pad_token_id), "cpu")
    return loss.item() / n


@pytest.mark.parametrize("method", list(BUDGET))
def test_zero3_update_is_zero_at_step_0(sparse_runs, method):
    model_dir, runs, _ = sparse_runs
    out_dir = runs[f"{method}_zero3"]
    assert train_losses(out_dir)[0] == pytest.approx(_first_step_base_loss(out_dir, model_dir), rel=1e-5)


def test_supra_resumed_under_zero3_continues_the_same_run(sparse_runs):
    _, runs, outputs = sparse_runs
    assert "resume: continuing from step 2" in outputs["supra_zero3_resume"]
    torch.testing.assert_close(
        torch.tensor(train_losses(runs["supra_zero3_resume"])),
        torch.tensor(train_losses(runs["supra_zero3"])),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("method", list(BUDGET))
def test_zero3_adapter_is_stock_peft_and_equals_the_zero0_one(sparse_runs, method, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dsee_dist.recipes import methods
    from dsee_dist.recipes.generate import load_generation_model

    model_dir, runs, _ = sparse_runs
    adapter = runs[f"{method}_zero3"] / "adapter"
    assert json.loads((runs[f"{method}_zero3"] / "trained.json").read_text()) == {"method": method, "path": "adapter"}
    three = load_file(str(adapter / "adapter_model.safetensors"))
    zero = load_file(str(runs[f"{method}_zero0"] / "adapter" / "adapter_model.safetensors"))
    assert set(three) == set(zero) and all(t.numel() > 0 for t in three.values())
    for key, tensor in three.items():
        torch.testing.assert_close(tensor, zero[key], rtol=1e-4, atol=1e-5, msg=key)  # incl. the support indices
    ids = torch.arange(1, 17).reshape(2, 8)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        expected = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
        assert (expected - plain).abs().max() > 1e-4  # the trained update is there
        model, _, kind = load_generation_model(str(adapter))  # what `dsee-dist generate` runs
        assert kind == "peft-adapter"
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
        merged = methods.merge_peft_adapter(adapter, tmp_path / "merged")
        folded = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)


def test_stock_peft_on_a_zero3_partitioned_model(sparse_runs, tmp_path):
    """Stock Supertuning cannot be created on a partitioned model: it picks its support from the weight's
    empty placeholder. Created on the gathered weight (as recipes/methods.py does), its forward is exact, and
    so is stock SHiRA's (the mask needs only the shape; DeepSpeed gathers the base weight the layer reads)."""
    model_dir, _, _ = sparse_runs
    proc = run_module(2, ["tests.distributed.peft_zero3_probe", str(model_dir), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        placeholder = record["placeholder"]
        assert placeholder == {"partitioned": True, "data_numel": 0, "full_shape": [32, 32]}
        create = record["supertuning_create"]
        assert not create["ok"] and create["error"] == "ValueError"
        assert "leaves no trainable entries for a weight with 0 elements" in create["message"]
        for key in ("supertuning_gathered_forward", "shira_forward"):
            assert record[key] == {"ok": True, "result": 0.0}, key  # equals the whole base model's logits


@pytest.mark.parametrize("method", list(BUDGET))
def test_export_of_a_zero3_checkpoint_gives_the_runs_adapter_and_its_merged_model(sparse_runs, method, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dsee_dist.recipes.export import main as export_main

    model_dir, runs, _ = sparse_runs
    run = runs[f"{method}_zero3"]
    assert export_main([str(run), "--adapter", str(tmp_path / "adapter"), "--merged", str(tmp_path / "merged")]) == 0
    written = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(exported) == set(written)
    for key, tensor in exported.items():
        torch.testing.assert_close(tensor, written[key], rtol=0, atol=0, msg=key)
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        expected = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
