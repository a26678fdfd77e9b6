"""bench/llamacpp.py's scored decode: llama.cpp's greedy outputs from an f32 GGUF equal transformers' greedy
outputs of the same directory (same prompts, stop tokens and cleaning). Needs llama-cpp-python (docs/GGUF.md);
skipped without it."""

import pytest
import torch

from tests.conftest import REPO

pytest.importorskip("llama_cpp", reason="llama.cpp absent: pip install llama-cpp-python (docs/GGUF.md)")

E2E_SAMPLE = REPO / "dsee_dist" / "data" / "e2e_sample"


def test_llamacpp_greedy_outputs_equal_transformers_on_an_f32_export(tiny_models, tmp_path):
    from bench import llamacpp
    from bench._quality_decode import decode_mrs, load_decoder
    from dsee_dist.eval.references import read_references

    model_dir = str(tiny_models["llama"])
    llamacpp.export(model_dir, tmp_path / "m.gguf", "f32")
    mrs = read_references(E2E_SAMPLE / "test.csv").mrs[:6]
    model, tokenizer = load_decoder(model_dir, "cpu", torch.float32)
    expected, _ = decode_mrs(model, tokenizer, mrs, "greedy", batch_size=1, max_new_tokens=12)
    assert llamacpp.greedy_outputs(tmp_path / "m.gguf", model_dir, mrs, 12, threads=1) == expected
