"""A tiny Llama with grouped-query attention (9 query / 3 KV heads, SwiGLU) through the real launcher:
`dsee.target_modules` left at auto, the same losses under ZeRO-2 at world size 1 and 2 and under ZeRO-3
at world size 2."""

import pytest
import torch

from tests.distributed.launch import TINY_RUN, run_jobs_in_one_launch, run_training, train_losses

pytestmark = pytest.mark.distributed

LLAMA_RUN = [o for o in TINY_RUN if not o.startswith(("model.builtin", "model.tokenizer_vocab_size"))]
RUNS = {
    "ws1_zero2": (1, "configs/ds/zero2_fp32.json"),
    "ws2_zero2": (2, "configs/ds/zero2_fp32.json"),
    "ws2_zero3": (2, "configs/ds/zero3_fp32.json"),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random tiny Llama (GQA, odd head count) with a tokenizer trained on the synthetic task's texts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsee_dist.data.synthetic_e2e import generate_examples
    from dsee_dist.models.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("llama") / "base"
    tokenizer = train_bpe_tokenizer([f"{mr} {ref}" for mr, ref in generate_examples(256, 0)], 400)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=72,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_llama_losses_agree_across_zero_stages_and_world_sizes(llama_dir, tmp_path):
    losses = {}
    for world in (1, 2):  # the jobs of one world size in one launch (tests/distributed/sequential_jobs.py)
        micro = ["train.micro_batch_size=8"] if world == 1 else []  # the same global batch (8)
        jobs = {
            name: (
                tmp_path / name,
                [
                    *LLAMA_RUN,
                    *micro,
                    "model.builtin=null",
                    "dsee.target_modules=auto",
                    f"model.path={llama_dir}",
                    f"deepspeed.config={ds}",
                    "eval.every_n_steps=0",
                ],
            )
            for name, (w, ds) in RUNS.items()
            if w == world
        }
        for name, output in run_jobs_in_one_launch(world, jobs).items():
            assert "in 4 DSEE layers" in output  # auto: q_proj and v_proj of 2 layers
            losses[name] = torch.tensor(train_losses(tmp_path / name))
    reference = losses["ws1_zero2"]
    assert len(reference) == 6 and reference[-1] < reference[0]
    for name, values in losses.items():
        torch.testing.assert_close(values, reference, rtol=1e-5, atol=1e-6, msg=f"{name} diverges from ws1_zero2")


def test_two_stage_structured_on_llama_exports_a_stock_llama_with_the_training_logits(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from dsee_dist.recipes.export import build_model_from_checkpoint, resolve_checkpoint

    out = tmp_path / "two_stage"
    run_training(
        1,
        out,
        *LLAMA_RUN,
        "model.builtin=null",
        "dsee.target_modules=auto",
        f"model.path={llama_dir}",
        "deepspeed.config=configs/ds/zero2_fp32.json",
        "eval.every_n_steps=0",
        "train.micro_batch_size=8",
        "train.max_steps=4",
        "prune.method=structured",
        "prune.head_ratio=0.25",
        "prune.mlp_ratio=0.25",
        "prune.retrain_steps=3",
    )
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()  # stock transformers, no remote code
    assert type(final) is LlamaForCausalLM
    assert (final.config.num_attention_heads, final.config.num_key_value_heads, final.config.intermediate_size) == (
        6,
        3,
        72,
    )
    trained, _, _ = build_model_from_checkpoint(resolve_checkpoint(str(out)))
    x = torch.randint(0, final.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(final(x).logits, trained(x).logits, atol=1e-5, rtol=1e-5)
