"""One adapted projection, forward + backward: DSEE's sparse update as the layer applies it, and its alternatives,
against PEFT's LoRA layer on the same frozen matrix and input, measured in one run.

    python bench/dsee_layer.py [--device auto|cpu|gpu] [--tokens 8192] [--rank 16] [--num-sparse 64] [--iters 50]

Where DSEE's extra step time could come from, isolated from the rest of the model: for each projection shape, the
median time of y = layer(x); y.backward(g) (x requires grad, as inside a network; only the adapter is trainable):
- lora: PEFT's `lora.Linear` (r, alpha 2r) around the frozen nn.Linear.
- dsee-lowrank: `DSEELayer` with no sparse values (its low-rank path alone).
- dsee: `DSEELayer` as trained (low-rank + N sparse values: gather of N input columns, scatter-add into N outputs).
- dsee-folded: the same update with the sparse part folded into the two low-rank matrix products
  (x [A; P]^T, then [B | Q]: P holds the N values at their columns, Q is the 0/1 matrix of their rows), checked
  equal to `dsee`'s output and gradients before timing.
- dsee-dense: the sparse part materialised as a dense out x in matrix added to the frozen weight's product
  (the naive implementation the issue suspects).
Shapes by device: gpu (bf16): TinyLlama-1.1B q_proj 2048 x 2048 and v_proj 256 x 2048, GPT-2-medium's fused
c_attn 3072 x 1024 with its q and v thirds adapted, 8192 tokens (16 x 512); cpu (fp32): 512 x 512, 128 x 512
and 1536 x 512 (q and v thirds), 512 tokens. Without a CUDA GPU, `--device gpu` prints one line saying it was
skipped.

Last line: JSON with, per shape, each variant's median milliseconds and its ratio to lora.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _launch import device_kind  # noqa: E402

from dsee_dist.dsee.layer import DSEELayer  # noqa: E402

# name -> (out, in, adapted slices or None for the whole matrix)
SHAPES = {
    "gpu": {
        "tinyllama q_proj 2048x2048": (2048, 2048, None),
        "tinyllama v_proj 256x2048": (256, 2048, None),
        "gpt2-medium c_attn 3072x1024 (q, v)": (3072, 1024, [(0, 1024), (2048, 1024)]),
    },
    "cpu": {
        "q_proj 512x512": (512, 512, None),
        "v_proj 128x512": (128, 512, None),
        "c_attn 1536x512 (q, v)": (1536, 512, [(0, 512), (1024, 512)]),
    },
}
TOKENS = {"gpu": 8192, "cpu": 512}
VARIANTS = ("lora", "dsee-lowrank", "dsee", "dsee-folded", "dsee-dense")


def random_support(out_features: int, in_features: int, slices, per_slice: int, seed: int) -> torch.Tensor:
    """N distinct (row, column) entries per adapted slice, uniformly at random (the cost does not depend on where)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for start, size in slices or [(0, out_features)]:
        flat = torch.randperm(size * in_features, generator=g)[:per_slice]
        parts.append(torch.stack([flat // in_features + start, flat % in_features]))
    return torch.cat(parts, dim=1)


def folded_delta(layer: DSEELayer, x: torch.Tensor) -> torch.Tensor:
    """B A x + S x as two matrix products: the N sparse entries become N extra rank-one terms."""
    rows, cols = layer.sparse_index
    n = rows.numel()
    picks = torch.arange(n, device=x.device)
    p = layer.sparse_values.new_zeros(n, layer.in_features).index_put((picks, cols), layer.sparse_values)
    q = layer.lora_b.new_zeros(layer.out_features, n).index_put_((rows, picks), layer.lora_b.new_ones(n))
    first = F.linear(x, torch.cat([layer.lora_a, p]))
    return F.linear(first, torch.cat([layer._placed_lora_b(), q], dim=1))


def dense_delta(layer: DSEELayer, x: torch.Tensor) -> torch.Tensor:
    rows, cols = layer.sparse_index
    dense = layer.sparse_values.new_zeros(layer.out_features, layer.in_features).index_put(
        (rows, cols), layer.sparse_values
    )
    return F.linear(F.linear(x, layer.lora_a), layer._placed_lora_b()) + F.linear(x, dense)


def build(variant: str, out_f: int, in_f: int, slices, args, device, dtype):
    """(module or callable taking x, its trainable parameters) for one variant, on a fresh frozen base."""
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f, bias=False).to(device, dtype).requires_grad_(False)
    if variant == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=["proj"])
        layer = inject_adapter_in_model(config, torch.nn.ModuleDict({"proj": base})).proj.to(device, dtype)
        return layer, [p for p in layer.parameters() if p.requires_grad]
    per_slice = 0 if variant == "dsee-lowrank" else args.num_sparse
    support = random_support(out_f, in_f, slices, per_slice, seed=1) if per_slice else None
    layer = DSEELayer(base, rank=args.rank, alpha=2 * args.rank, slices=slices, sparse_index=support).to(device)
    with torch.no_grad():  # non-zero B and values, so every path computes something real
        layer.lora_b.normal_(0, 0.02)
        if layer.sparse_values is not None:
            layer.sparse_values.normal_(0, 0.02)
    params = [layer.lora_a, layer.lora_b] + ([layer.sparse_values] if layer.sparse_values is not None else [])
    if variant in ("dsee", "dsee-lowrank"):
        return layer, params
    delta = folded_delta if variant == "dsee-folded" else dense_delta
    return (lambda x: torch.add(layer.base(x), delta(layer, x), alpha=layer.scaling)), params


def check_folded_equals_layer(out_f, in_f, slices, args, device, dtype) -> None:
    layer, params = build("dsee", out_f, in_f, slices, args, device, torch.float32)
    x = torch.randn(64, in_f, device=device)
    for fn in (layer, lambda t: torch.add(layer.base(t), folded_delta(layer, t), alpha=layer.scaling)):
        for p in params:
            p.grad = None
        y = fn(x)
        y.square().sum().backward()
        if fn is layer:
            want = (y.detach(), [p.grad.clone() for p in params])
    torch.testing.assert_close(y.detach(), want[0], rtol=1e-4, atol=1e-5)
    for p, g in zip(params, want[1]):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def time_variant(fn, params, x, grad, iters: int, device) -> float:
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        fn(x).backward(grad)

    for _ in range(5):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--rank", type=int, default=None, help="default 16 on GPU, 8 on CPU")
    p.add_argument("--num-sparse", type=int, default=64, help="sparse values per adapted slice")
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    kind = device_kind(args.device, "dsee_layer.py", "the GPU layer benchmark (bf16)")
    if kind is None:
        return
    device = torch.device("cuda" if kind == "gpu" else "cpu")
    dtype = torch.bfloat16 if kind == "gpu" else torch.float32
    args.rank = args.rank or (16 if kind == "gpu" else 8)
    tokens = args.tokens or TOKENS[kind]
    results = {}
    for name, (out_f, in_f, slices) in SHAPES[kind].items():
        check_folded_equals_layer(out_f, in_f, slices, args, device, dtype)
        x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, out_f, device=device, dtype=dtype)
        ms = {}
        for variant in VARIANTS:
            fn, params = build(variant, out_f, in_f, slices, args, device, dtype)
            ms[variant] = time_variant(fn, params, x, grad, args.iters, device) * 1000
        results[name] = {v: {"ms": round(t, 4), "over_lora": round(t / ms["lora"], 3)} for v, t in ms.items()}
        print(f"{name} ({tokens} tokens, r {args.rank}, N {args.num_sparse} per slice):", flush=True)
        for v, t in ms.items():
            print(f"  {v:13s} {t:9.3f} ms  {t / ms['lora']:.3f} x lora", flush=True)
    print(json.dumps({"device": kind, "dtype": str(dtype), "tokens": tokens, "shapes": results}))


if __name__ == "__main__":
    main()
