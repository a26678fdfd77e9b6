"""method=lora through the real trainer: 2 ranks under ZeRO-3 against 1 rank under ZeRO-0 (same seed and
data), and the PEFT adapter written under ZeRO-3 holds the real, trained tensors."""

import pytest
import torch
from safetensors.torch import load_file

from tests.bench.conftest import SAMPLE, save_tiny_model
from tests.distributed.launch import run_training, train_losses

pytestmark = pytest.mark.distributed

LORA_RUN = [
    "method=lora",
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
    "train.max_steps=4",
    "train.micro_batch_size=4",
    "train.lr=1e-2",
    "train.log_every_n_steps=1",
    "train.warmup_steps=0",
    "eval.every_n_steps=0",
    "eval.micro_batch_size=4",
]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = save_tiny_model("llama", root / "model")
    runs = {}
    for name, world, ds in (
        ("ws1_zero0", 1, "configs/ds/zero0_fp32.json"),
        ("ws2_zero3", 2, "configs/ds/zero3_fp32.json"),
    ):
        # world 1 takes the whole global batch of 8 in two micro-batches; world 2 one micro-batch per rank
        accum = 2 if world == 1 else 1
        run_training(
            world,
            root / name,
            f"model.path={model}",
            f"deepspeed.config={ds}",
            f"train.grad_accum_steps={accum}",
            *LORA_RUN,
        )
        runs[name] = root / name
    return model, runs


def test_lora_losses_agree_across_zero3_and_world_sizes(lora_runs):
    _, runs = lora_runs
    one, two = train_losses(runs["ws1_zero0"]), train_losses(runs["ws2_zero3"])
    assert len(one) == 4 and one == pytest.approx(two, rel=1e-4, abs=1e-5)
    assert one[-1] < one[0]


def test_zero3_lora_adapter_is_peft_and_holds_the_trained_tensors(lora_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dsee_dist.recipes.generate import load_generation_model

    model_dir, runs = lora_runs
    one = load_file(str(runs["ws1_zero0"] / "adapter" / "adapter_model.safetensors"))
    three = load_file(str(runs["ws2_zero3"] / "adapter" / "adapter_model.safetensors"))
    assert set(one) == set(three) and len(three) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for key, tensor in three.items():
        assert tensor.numel() > 0 and tensor.shape == one[key].shape, key
        torch.testing.assert_close(tensor, one[key], rtol=1e-4, atol=1e-5)
    assert all(float(t.abs().sum()) > 0 for k, t in three.items() if "lora_B" in k)  # trained (B starts at 0)
    # PEFT reloads it, and `dsee-dist generate` reads the adapter directory as a PEFT adapter
    ids = torch.arange(1, 17).reshape(2, 8)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    expected = PeftModel.from_pretrained(base, str(runs["ws2_zero3"] / "adapter")).eval()(input_ids=ids).logits
    model, _, kind = load_generation_model(str(runs["ws2_zero3"] / "adapter"))
    assert kind == "peft-adapter"
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
