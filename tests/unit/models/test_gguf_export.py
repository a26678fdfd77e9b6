"""GGUF export: transformers reads the file back (its own GGUF loader, which undoes llama.cpp's q/k row order)
and gives the Hugging Face model's logits; the tokenizer, special tokens and chat template come back too.

Tolerances, max |logit difference| over a (2, 12) batch (the tiny models' logits: std ~0.16, max ~0.6):
f32 1e-5 (observed 1e-7 to 2.4e-7: the same weights, the summation order at most); f16 2e-3 (observed 3.2e-4);
q8_0 2e-2 (observed 6.9e-3: 8-bit values in blocks of 32, one f16 scale each).
"""

import subprocess
import sys

import pytest
import torch

from dsee_dist.errors import DSEEError
from dsee_dist.models.gguf_export import permute_qk, write_gguf
from dsee_dist.models.tokenizer import train_bpe_tokenizer
from tests.conftest import REPO

TEXTS = ["the quick brown fox jumps over the lazy dog 12345", "hello world, a tiny model for GGUF tests"] * 10
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"

# name -> (transformers config class, its arguments): dense GQA Llama; a structurally pruned Llama as
# dsee_dist.pruning.structured writes it (2 of 3 query heads kept per KV group: 6 heads of head_dim 8 in a
# hidden size of 72, an MLP cut from 96 to 80, tied embeddings); Qwen2 with q/k/v biases; Mistral.
CASES = {
    "llama_gqa": (
        "LlamaConfig",
        dict(hidden_size=72, intermediate_size=96, num_attention_heads=9, num_key_value_heads=3, rope_theta=50000.0),
    ),
    "llama_pruned": (
        "LlamaConfig",
        dict(
            hidden_size=72,
            intermediate_size=80,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=8,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": (
        "MistralConfig",
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    ),
    # rows of 64 and 96: every matrix is q8_0 (blocks of 32)
    "llama_q8": (
        "LlamaConfig",
        dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe_tokenizer(TEXTS, 300)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny(kind: str, vocab_size: int, seed: int = 0):
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, kwargs = CASES[kind]
    config = getattr(transformers, class_name)(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        max_position_embeddings=64,
        attn_implementation="eager",
        **kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial biases and norms, so a misplaced row shows in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def round_trip(tmp_path, kind: str, tokenizer, gguf_type: str):
    """(max |logit difference| between the HF model and transformers' reading of its GGUF, that model)."""
    from transformers import AutoModelForCausalLM

    model = tiny(kind, len(tokenizer))
    summary = write_gguf(model, tokenizer, tmp_path / "model.gguf", gguf_type)
    assert summary["type"] == gguf_type and not (tmp_path / "model.gguf.partial").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(ids).logits - back(ids).logits).abs().max().item(), back


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_pruned", "qwen2", "mistral"])
def test_f32_gguf_reads_back_to_the_same_logits(tmp_path, tokenizer, kind):
    diff, back = round_trip(tmp_path, kind, tokenizer, "f32")
    assert diff < 1e-5, diff
    model_config = CASES[kind][1]
    assert back.config.num_attention_heads == model_config["num_attention_heads"]
    assert back.config.num_key_value_heads == model_config["num_key_value_heads"]
    assert back.config.intermediate_size == model_config["intermediate_size"]


def test_pruned_gguf_states_its_head_width(tmp_path, tokenizer):
    from gguf import GGUFReader

    write_gguf(tiny("llama_pruned", len(tokenizer)), tokenizer, tmp_path / "m.gguf", "f32")
    fields = GGUFReader(tmp_path / "m.gguf").fields
    value = {k: int(fields[k].parts[fields[k].data[0]][0]) for k in fields if k.startswith("llama.")}
    assert value["llama.attention.head_count"] == 6 and value["llama.attention.head_count_kv"] == 3
    assert value["llama.attention.key_length"] == 8 and value["llama.attention.value_length"] == 8
    assert value["llama.rope.dimension_count"] == 8 and value["llama.feed_forward_length"] == 80


@pytest.mark.parametrize(("gguf_type", "tolerance"), [("f16", 2e-3), ("q8_0", 2e-2)])
def test_lower_precision_gguf_is_close(tmp_path, tokenizer, gguf_type, tolerance):
    from gguf import GGMLQuantizationType, GGUFReader

    diff, _ = round_trip(tmp_path, "llama_q8", tokenizer, gguf_type)
    assert 0 < diff < tolerance, diff
    types = {t.name: t.tensor_type for t in GGUFReader(tmp_path / "model.gguf").tensors}
    want = GGMLQuantizationType.Q8_0 if gguf_type == "q8_0" else GGMLQuantizationType.F16
    assert types["blk.0.attn_q.weight"] == want and types["blk.0.ffn_down.weight"] == want
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32


def test_tokenizer_and_chat_template_round_trip(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    write_gguf(tiny("llama_gqa", len(tokenizer)), tokenizer, tmp_path / "m.gguf", "f16")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS[:2] + ["unseen words 987 and <|endoftext|> too"]:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert back.chat_template == CHAT_TEMPLATE
    assert back.eos_token == tokenizer.eos_token and back.bos_token == tokenizer.bos_token


def test_permutation_is_llama_cpps(tokenizer):
    """Per head, rows [x0, x1, y0, y1] -> [x0, y0, x1, y1] (llama.cpp's convert_hf_to_gguf.py permute)."""
    w = torch.arange(8.0).reshape(8, 1)  # 2 heads of 4 rows
    assert permute_qk(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_other_family_is_refused_before_writing(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=len(tokenizer)))
    with pytest.raises(DSEEError, match="model_type 'gpt2' is not one"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.iterdir())


def _export(*args):
    return subprocess.run(
        [sys.executable, "-m", "dsee_dist", "export", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_gguf_of_a_model_directory_and_refuses_gpt2(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny("llama_pruned", len(tokenizer))
    model.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    proc = _export(str(tmp_path / "pruned"), "--gguf", str(tmp_path / "out" / "pruned.gguf"), "--gguf-type", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "pruned.gguf").is_file() and "GGUF written" in proc.stdout

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4)).save_pretrained(tmp_path / "gpt2")
    proc = _export(str(tmp_path / "gpt2"), "--gguf", str(tmp_path / "gpt2.gguf"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "dsee-dist export: error: GGUF export writes Llama-family models (llama, mistral, qwen2), and model_type "
        "'gpt2' is not one; export it with --merged and convert it with llama.cpp's own convert_hf_to_gguf.py"
    ]
    assert not (tmp_path / "gpt2.gguf").exists() and not (tmp_path / "gpt2.gguf.partial").exists()


def test_the_projects_structured_pruning_output_round_trips(tmp_path, tokenizer):
    """dsee_dist.pruning.structured on the tiny GQA Llama (9 -> 6 heads of 8 in 72, MLP 96 -> 72), its embedding
    grown to the test tokenizer's size (the family table's models have a 97-token vocabulary)."""
    from transformers import AutoModelForCausalLM

    from dsee_dist.config import PruneConfig
    from dsee_dist.dsee.adapter import read_adapter
    from dsee_dist.pruning.structured import prune_structured
    from tests.unit.models.family_models import SINGLE, stage1

    base_dir, adapter_dir, _, _ = stage1(tmp_path, "llama_gqa")
    cfg = PruneConfig(method="structured", head_ratio=0.25, mlp_ratio=0.25)
    prune_structured(cfg, str(base_dir), read_adapter(adapter_dir), tmp_path / "pruned", SINGLE, log=lambda m: None)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    pruned.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    assert (pruned.config.num_attention_heads, pruned.config.head_dim, pruned.config.intermediate_size) == (6, 8, 72)
    write_gguf(pruned, tokenizer, tmp_path / "gguf" / "pruned.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="pruned.gguf", dtype=torch.float32)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, pruned(ids).logits, atol=1e-5, rtol=0)


def test_checkpoint_is_merged_on_the_fly_into_the_gguf(tmp_path, tokenizer):
    """`dsee-dist export CKPT --gguf`: a (ZeRO-0 layout) DSEE checkpoint on a tiny Llama, merged in memory; the
    GGUF computes what the adapted model computes."""
    import copy
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from dsee_dist.config import Config
    from dsee_dist.dsee.inject import dsee_layers, find_targets, inject_dsee
    from dsee_dist.dsee.placement import SUPPORT_FILE
    from dsee_dist.engine.checkpoint import MANIFEST, TRAINER_STATE
    from dsee_dist.recipes.export import main
    from tests.unit.models.family_models import magnitude_support

    base = tiny("llama_q8", len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    cfg = Config()
    cfg.dsee.lora_rank, cfg.dsee.lora_alpha, cfg.dsee.num_sparse = 4, 8.0, 6
    cfg.dsee.target_modules, cfg.dsee.fused_slices = ["q_proj", "v_proj"], []
    adapted = copy.deepcopy(base)
    specs = find_targets(adapted, cfg.dsee.target_modules, [])
    support = magnitude_support(adapted, specs, cfg.dsee.num_sparse)
    inject_dsee(adapted, specs, support, rank=4, alpha=8.0, dropout=0.0, seed=cfg.train.seed)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(("lora_b", "sparse_values")):
                p.normal_(0, 0.2)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    module = {
        f"{n}.{k}": p.detach().clone()
        for n, layer in dsee_layers(adapted).items()
        for k, p in layer.adapter_params().items()
    }
    torch.save({"module": module}, ckpt / "mp_rank_00_model_states.pt")
    save_file({k: v.contiguous() for k, v in support.items()}, str(ckpt / SUPPORT_FILE))
    state = {"step": 2, "world_size": 1, "zero_stage": 0, "base_model": str(tmp_path / "base"), "config": cfg.to_dict()}
    (ckpt / TRAINER_STATE).write_text(json.dumps(state))
    (ckpt / MANIFEST).write_text("{}")

    assert main([str(ckpt), "--gguf", str(tmp_path / "out" / "run.gguf"), "--gguf-type", "f32"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="run.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = adapted.eval()(ids).logits
        assert (expected - base(ids).logits).abs().max() > 1e-3  # the update is not negligible
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=0)
