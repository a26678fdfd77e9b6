"""2:4 sparsity where GPUs accelerate it (issue 41): dense vs semi-structured sparse
(`torch.sparse.to_sparse_semi_structured`, sparse tensor cores) on a CUDA GPU, fp16.

    python bench/sparse24.py [--model DIR_OF_A_2:4_EXPORT] [--out results/sparse24]

1. Matmul: every block matrix shape of SmolLM2-135M (q/o 576 x 576, k/v 192 x 576, gate/up 1536 x 576, down
   576 x 1536), a random weight kept 2:4 (the 2 largest of every 4 consecutive inputs of a row, as
   `prune.pattern: 2:4` keeps them), times `F.linear` for a prefill-sized input (--tokens rows) and a decode-sized
   one (1 row), dense and semi-structured; median of --repeats CUDA-event timings after warm-up, ratio dense / 2:4.
2. Decode (with --model: a `prune.pattern: 2:4` export, e.g. `final/` of a two-stage run or a pruning_ppl
   model): every decoder-block linear whose weight is 2:4 is converted, the rest stay dense (named); the
   largest |logit| difference against the same model with dense weights, and greedy tokens/s at --batch x
   --new-tokens (alternating dense and sparse, median of --repeats).

Without a CUDA GPU it prints one line and writes nothing: semi-structured kernels are GPU-only, so on CPU the
figures are unmeasured. Results: OUT/sparse24.json with device, versions, date and commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._common import write_result  # noqa: E402

SMOLLM2_SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up": (1536, 576), "down": (576, 1536)}


def keep_2_4(w: torch.Tensor) -> torch.Tensor:
    """`w` with the 2 smallest |entries| of every 4 consecutive inputs of each row set to zero."""
    groups = w.reshape(w.shape[0], -1, 4)
    drop = groups.abs().argsort(dim=2)[..., :2]
    return groups.scatter(2, drop, 0).reshape(w.shape)


def is_2_4(w: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive inputs of every row holds at most 2 nonzeros."""
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(2) <= 2).all())


def cuda_ms(x: torch.Tensor, weight, repeats: int) -> float:
    """Median milliseconds of `F.linear(x, weight)` over `repeats` CUDA-event timings, after 5 warm-up calls."""

    def fn():
        return F.linear(x, weight)

    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_rows(tokens: int, repeats: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for name, (out_f, in_f) in SMOLLM2_SHAPES.items():
        dense = keep_2_4(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16))
        sparse = to_sparse_semi_structured(dense)
        for n in (tokens, 1):
            x = torch.randn(n, in_f, device="cuda", dtype=torch.float16)
            torch.testing.assert_close(F.linear(x, sparse), F.linear(x, dense), atol=0.05, rtol=0.01)
            d, s = cuda_ms(x, dense, repeats), cuda_ms(x, sparse, repeats)
            rows.append({"matrix": name, "shape": [out_f, in_f], "tokens": n, "dense_ms": d, "sparse_ms": s})
            print(f"{name} {out_f}x{in_f}, {n} tokens: dense {d:.4f} ms, 2:4 {s:.4f} ms ({d / s:.2f}x)", flush=True)
    return rows


def sparsify(model) -> tuple[int, list[str]]:
    """Convert every decoder-block nn.Linear whose weight is 2:4; (converted, names left dense)."""
    from torch.sparse import to_sparse_semi_structured

    converted, dense = 0, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            if is_2_4(module.weight):
                module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()), False)
                converted += 1
            else:
                dense.append(name)
    return converted, dense


def decode_speed(model_dir: str, batch: int, new_tokens: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    from bench._common import exact_generate_seconds

    models = {}
    for kind in ("dense", "2:4"):
        models[kind] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).cuda().eval()
    converted, left_dense = sparsify(models["2:4"])
    ids = torch.randint(100, 1000, (batch, 32), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        diff = (models["dense"](ids).logits - models["2:4"](ids).logits).abs().max().item()
    seconds = {kind: [] for kind in models}
    for _ in range(repeats):
        for kind, model in models.items():  # alternating
            seconds[kind].append(exact_generate_seconds(model, ids, mask, new_tokens, pad_token_id=0))
    tok_s = {k: batch * new_tokens / statistics.median(v) for k, v in seconds.items()}
    print(f"decode {batch} x {new_tokens}: dense {tok_s['dense']:.1f} tok/s, 2:4 {tok_s['2:4']:.1f} tok/s", flush=True)
    return {"converted": converted, "left_dense": left_dense, "max_abs_logit_diff": diff, "tokens_per_s": tok_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a prune.pattern 2:4 export directory (the decode figures)")
    p.add_argument("--out", default=str(REPO / "results" / "sparse24"))
    p.add_argument("--tokens", type=int, default=2048, help="rows of the prefill-sized matmul input")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/sparse24.py: no CUDA GPU: semi-structured 2:4 kernels are GPU-only; the 2:4 speed is unmeasured")
        return 0
    result = {"matmul": matmul_rows(args.tokens, args.repeats), "settings": vars(args)}
    if args.model:
        result["decode"] = decode_speed(args.model, args.batch, args.new_tokens, max(3, args.repeats // 5))
    write_result(Path(args.out) / "sparse24.json", result, "gpu")
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
