"""One adapted projection, forward + backward: DSEE's sparse update as the layer applies it, and its alternatives,
against PEFT's LoRA layer on the same frozen matrix and input, measured in one run.

    python bench/dsee_layer.py [--device auto|cpu|gpu] [--shapes default|smollm2] [--tokens 8192] [--rank 16]
                               [--num-sparse 64] [--iters 50] [--variants lora,dsee,...] [--profile] [--out JSON]

Where DSEE's extra step time could come from, isolated from the rest of the model: for each projection shape, the
median time of y = layer(x); y.backward(g) (x requires grad, as inside a network; only the adapter is trainable):
- lora: PEFT's `lora.Linear` (r, alpha 2r) around the frozen nn.Linear.
- dsee-lowrank: `DSEELayer` with no sparse values (its low-rank path alone).
- dsee: `DSEELayer` with the "autograd" sparse path (low-rank + N sparse values: gather of N input columns,
  scatter-add into N outputs, each op differentiated by autograd; dsee_dist/dsee/layer.py).
- dsee-fused: the same layer with the "fused" path (`LowRankSparseDelta`: the low-rank products, the gather, the
  multiply and the scatter in one autograd function, one backward), checked bitwise equal to `dsee`'s output and
  gradients before timing.
- dsee-folded: the same update with the sparse part folded into the two low-rank matrix products
  (x [A; P]^T, then [B | Q]: P holds the N values at their columns, Q is the 0/1 matrix of their rows), checked
  equal to `dsee`'s output and gradients before timing.
- dsee-dense: the sparse part materialised as a dense out x in matrix added to the frozen weight's product
  (the naive implementation the issue suspects).
- dsee-compiled: `torch.compile` of the `dsee` layer (inductor; on CPU it needs a C++ compiler); reported as
  failed, not timed, where compiling fails.
- supra: PEFT's Supertuning layer with r set (the Supra hybrid: LoRA r, alpha 2r, plus trainable single entries
  at the largest |W|, composed into a dense W + S copy every forward), its sparsity chosen by
  recipes/methods.supra_budget so it holds as many sparse entries as dsee (N per adapted slice, on the whole
  matrix: PEFT cannot adapt a slice).
- shira: PEFT's SHiRA layer, r(in + out) single entries on a random mask (LoRA's count), as recipes/methods.py
  builds it.
Shapes by device: gpu (bf16): TinyLlama-1.1B q_proj 2048 x 2048 and v_proj 256 x 2048, GPT-2-medium's fused
c_attn 3072 x 1024 with its q and v thirds adapted, 8192 tokens (16 x 512); cpu (fp32): 512 x 512, 128 x 512
and 1536 x 512 (q and v thirds), 512 tokens. `--shapes smollm2`: SmolLM2-135M's q_proj 576 x 576 and v_proj
192 x 576 (r 8, N 384 per matrix, 8 x 64 tokens unless set). Without a CUDA GPU, `--device gpu` prints one line
saying it was skipped.

Timing is interleaved: every iteration runs each variant once, in an order rotated per iteration, so a shared
machine's load falls on all variants alike; each variant's median is taken, and the spread of the per-iteration
ratios to lora (10th-90th percentile) is reported beside the ratio of medians. On a GPU each variant's
torch.cuda.max_memory_allocated over one extra step is reported as well. `--profile` adds torch.profiler's
self-CPU time per op for lora, dsee-lowrank, dsee and dsee-fused (per forward + backward, median over interleaved
rounds) to the JSON and prints the tables.

Last line: JSON with, per shape, each variant's median milliseconds and its ratio to lora; `--out` also writes
it, with the date, commit, versions and device, to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import device_kind, quantile, write_result  # noqa: E402

from dsee_dist.dsee import layer as dsee_layer  # noqa: E402
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
    "smollm2": {
        "smollm2-135m q_proj 576x576": (576, 576, None),
        "smollm2-135m v_proj 192x576": (192, 576, None),
    },
}
TOKENS = {"gpu": 8192, "cpu": 512, "smollm2": 512}
SMOLLM2 = dict(rank=8, num_sparse=384)  # recipes' SmolLM2-135M budget (configs, docs/results.md quality table)
VARIANTS = ("lora", "dsee-lowrank", "dsee", "dsee-folded", "dsee-dense")
NEW_VARIANTS = ("dsee-fused", "dsee-compiled", "supra", "shira")
ALL_VARIANTS = VARIANTS + NEW_VARIANTS


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


@contextlib.contextmanager
def sparse_path(device_type: str, path: str):
    """DSEE layers on `device_type` use sparse update `path` inside the block (dsee_dist/dsee/layer.py)."""
    before = dsee_layer.SPARSE_UPDATE_PATH.get(device_type)
    dsee_layer.set_sparse_update_path(device_type, path)
    try:
        yield
    finally:
        if before is None:
            dsee_layer.SPARSE_UPDATE_PATH.pop(device_type, None)
        else:
            dsee_layer.SPARSE_UPDATE_PATH[device_type] = before


def with_path(layer: DSEELayer, path: str):
    """`layer` called with sparse update `path` on its device type."""

    def call(x):
        with sparse_path(x.device.type, path):
            return layer(x)

    return call


def peft_layer(variant: str, base, slices, args, device, dtype):
    """PEFT's Supertuning (Supra: r + as many sparse entries as dsee) or SHiRA (LoRA's count) around `base`, built
    as recipes/methods.py builds them (the whole matrix: PEFT adapts no slices)."""
    from peft import ShiraConfig, SupertuningConfig, inject_adapter_in_model

    from dsee_dist.recipes.methods import supra_budget

    if variant == "supra":
        n_total = args.num_sparse * len(slices or [None])
        budget = supra_budget([base.weight.numel()], n_total)
        config = SupertuningConfig(
            target_modules=["proj"], sparsity=budget["sparsity"], r=args.rank, lora_alpha=2 * args.rank
        )
    else:
        config = ShiraConfig(r=args.rank, target_modules=["proj"], random_seed=0)
    layer = inject_adapter_in_model(config, torch.nn.ModuleDict({"proj": base})).proj.to(device, dtype)
    return layer, [p for p in layer.parameters() if p.requires_grad]


def build(variant: str, out_f: int, in_f: int, slices, args, device, dtype):
    """(module or callable taking x, its trainable parameters) for one variant, on a fresh frozen base."""
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f, bias=False).to(device, dtype).requires_grad_(False)
    if variant == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=["proj"])
        layer = inject_adapter_in_model(config, torch.nn.ModuleDict({"proj": base})).proj.to(device, dtype)
        return layer, [p for p in layer.parameters() if p.requires_grad]
    if variant in ("supra", "shira"):
        return peft_layer(variant, base, slices, args, device, dtype)
    per_slice = 0 if variant == "dsee-lowrank" else args.num_sparse
    support = random_support(out_f, in_f, slices, per_slice, seed=1) if per_slice else None
    layer = DSEELayer(base, rank=args.rank, alpha=2 * args.rank, slices=slices, sparse_index=support).to(device)
    with torch.no_grad():  # non-zero B and values, so every path computes something real
        layer.lora_b.normal_(0, 0.02)
        if layer.sparse_values is not None:
            layer.sparse_values.normal_(0, 0.02)
    params = [layer.lora_a, layer.lora_b] + ([layer.sparse_values] if layer.sparse_values is not None else [])
    if variant == "dsee-lowrank":
        return layer, params
    if variant in ("dsee", "dsee-fused"):
        return with_path(layer, "fused" if variant == "dsee-fused" else "autograd"), params
    if variant == "dsee-compiled":
        return torch.compile(with_path(layer, "autograd")), params
    delta = folded_delta if variant == "dsee-folded" else dense_delta
    return (lambda x: torch.add(layer.base(x), delta(layer, x), alpha=layer.scaling)), params


def _output_and_grads(fn, params, x0):
    x = x0.clone().requires_grad_(True)
    for p in params:
        p.grad = None
    y = fn(x)
    y.square().sum().backward()
    return y.detach(), [x.grad] + [p.grad.clone() for p in params]


def check_folded_equals_layer(out_f, in_f, slices, args, device, dtype) -> None:
    layer, params = build("dsee", out_f, in_f, slices, args, device, torch.float32)
    x = torch.randn(64, in_f, device=device)
    want_y, want_grads = _output_and_grads(layer, params, x)
    inner = layer.__closure__[0].cell_contents  # the DSEELayer inside with_path
    y, grads = _output_and_grads(
        lambda t: torch.add(inner.base(t), folded_delta(inner, t), alpha=inner.scaling), params, x
    )
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-5)
    for g, w in zip(grads[1:], want_grads[1:]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def check_fused_equals_layer(out_f, in_f, slices, args, device) -> None:
    """The fused sparse path gives bitwise the autograd path's output and gradients (x, A, B, values)."""
    fn, params = build("dsee", out_f, in_f, slices, args, device, torch.float32)
    inner = fn.__closure__[0].cell_contents
    x = torch.randn(3, 64, in_f, device=device)
    want = _output_and_grads(with_path(inner, "autograd"), params, x)
    got = _output_and_grads(with_path(inner, "fused"), params, x)
    for g, w in zip([got[0], *got[1]], [want[0], *want[1]]):
        if not torch.equal(g, w):
            raise AssertionError(f"fused sparse path differs from autograd's by {(g - w).abs().max().item():.3g}")


def _step(fn, params, x, grad):
    for p in params:
        p.grad = None
    x.grad = None
    fn(x).backward(grad)


def time_interleaved(built: dict, x, grad, iters: int, device) -> dict[str, list[float]]:
    """Seconds per forward + backward of every variant, one of each per iteration in a rotated order."""
    names = list(built)
    for name in names:  # warm-up (and compilation)
        for _ in range(5):
            _step(*built[name], x, grad)
    times = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn, params = built[name]
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _step(fn, params, x, grad)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                _step(fn, params, x, grad)
                times[name].append(time.perf_counter() - t0)
    return times


def time_variant(fn, params, x, grad, iters: int, device) -> float:
    """Median seconds of one variant timed alone."""
    return statistics.median(time_interleaved({"v": (fn, params)}, x, grad, iters, device)["v"])


def peak_gpu_bytes(fn, params, x, grad) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _step(fn, params, x, grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def profile_ops(built: dict, x, grad, rounds: int = 7, iters: int = 5, top: int = 10) -> dict:
    """torch.profiler's self-CPU microseconds per op, per forward + backward, for each variant in `built`:
    `rounds` interleaved rounds of `iters` steps per variant, each op's median over the rounds (a shared
    machine's load spikes fall into single rounds)."""
    from torch.profiler import ProfilerActivity, profile

    per_round = {name: [] for name in built}
    for fn, params in built.values():
        for _ in range(3):
            _step(fn, params, x, grad)
    for _ in range(rounds):
        for name, (fn, params) in built.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(iters):
                    _step(fn, params, x, grad)
            per_round[name].append({e.key: e.self_cpu_time_total / iters for e in prof.key_averages()})
    out = {}
    for name, rounds_ops in per_round.items():
        keys = {k for ops in rounds_ops for k in ops}
        median = {k: statistics.median(ops.get(k, 0.0) for ops in rounds_ops) for k in keys}
        ranked = sorted(median.items(), key=lambda kv: kv[1], reverse=True)
        total = statistics.median(sum(ops.values()) for ops in rounds_ops)
        print(f"--- profile: {name}, per forward + backward: {total:.0f} us self CPU (median of {rounds} rounds)")
        for key, us in ranked[:top]:
            print(f"  {key:45s} {us:9.1f} us", flush=True)
        out[name] = {
            "self_cpu_us_per_step": round(total, 1),
            "top_ops_us": {k: round(us, 1) for k, us in ranked[:top]},
        }
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--shapes", choices=["default", "smollm2"], default="default")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--rank", type=int, default=None, help="default 16 on GPU, 8 on CPU")
    p.add_argument("--num-sparse", type=int, default=None, help="sparse values per adapted slice (default 64)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help="lora is always timed (the reference)")
    p.add_argument("--profile", action="store_true", help="torch.profiler per-op times of lora and the dsee paths")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON (with date, commit, versions) here")
    return p.parse_args()


def build_variants(name: str, shape: tuple, variants: list[str], args, device, dtype, x, grad) -> tuple[dict, str]:
    """(the variants built for one shape, why dsee-compiled was not, or None): a compiled variant that fails its
    first step is reported and left out."""
    out_f, in_f, slices = shape
    built, failed = {}, None
    for variant in variants:
        built[variant] = build(variant, out_f, in_f, slices, args, device, dtype)
        if variant == "dsee-compiled":
            try:
                _step(*built[variant], x, grad)
            except Exception as exc:  # noqa: BLE001 - inductor's many failure types; reported, not timed
                failed = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"{name}: dsee-compiled not timed: {failed}", flush=True)
                del built[variant]
    return built, failed


def measure_shape(name: str, shape: tuple, variants: list[str], tokens: int, args, device, dtype) -> dict:
    """One shape: the equivalence checks, then every variant timed interleaved (ms, ratio to lora, per-iteration
    p10-p90 of the ratio; GPU peak; --profile's per-op times), its lines printed."""
    out_f, in_f, slices = shape
    check_folded_equals_layer(out_f, in_f, slices, args, device, dtype)
    check_fused_equals_layer(out_f, in_f, slices, args, device)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=device, dtype=dtype)
    built, failed = build_variants(name, shape, variants, args, device, dtype, x, grad)
    out = {"failed": failed, "peaks": None, "profile": None}
    if args.profile:
        profiled = ("lora", "dsee-lowrank", "dsee", "dsee-fused")
        out["profile"] = profile_ops({v: built[v] for v in profiled if v in built}, x, grad)
    times = time_interleaved(built, x, grad, args.iters, device)
    ms = {v: statistics.median(t) * 1000 for v, t in times.items()}
    out["results"] = {v: {"ms": round(t, 4), "over_lora": round(t / ms["lora"], 3)} for v, t in ms.items()}
    out["spread"] = {}
    for v, t in times.items():
        per_iter = [a / b for a, b in zip(t, times["lora"])]
        out["spread"][v] = [round(quantile(per_iter, 0.1), 3), round(quantile(per_iter, 0.9), 3)]
    if device.type == "cuda":
        out["peaks"] = {v: peak_gpu_bytes(*built[v], x, grad) for v in built}
        for v in built:
            out["results"][v]["peak_gpu_over_lora"] = round(out["peaks"][v] / out["peaks"]["lora"], 3)
    print(f"{name} ({tokens} tokens, r {args.rank}, N {args.num_sparse} per slice):", flush=True)
    for v, t in ms.items():
        lo, hi = out["spread"][v]
        print(f"  {v:13s} {t:9.3f} ms  {t / ms['lora']:.3f} x lora  (per-iteration p10-p90 {lo}-{hi})", flush=True)
    return out


def main() -> None:
    args = parse_args()
    kind = device_kind(args.device, "dsee_layer.py", "the GPU layer benchmark (bf16)")
    if kind is None:
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if kind == "gpu" else "cpu")
    dtype = torch.bfloat16 if kind == "gpu" else torch.float32
    shape_set = kind if args.shapes == "default" else args.shapes
    defaults = SMOLLM2 if args.shapes == "smollm2" else {"rank": 16 if kind == "gpu" else 8, "num_sparse": 64}
    args.rank = args.rank or defaults["rank"]
    args.num_sparse = args.num_sparse or defaults["num_sparse"]
    variants = ["lora", *[v for v in args.variants.split(",") if v and v != "lora"]]
    if set(variants) - set(ALL_VARIANTS):
        sys.exit(f"bench/dsee_layer.py: unknown variants {sorted(set(variants) - set(ALL_VARIANTS))}")
    tokens = args.tokens or (TOKENS[shape_set] if args.shapes == "smollm2" else TOKENS[kind])
    measured = {
        name: measure_shape(name, shape, variants, tokens, args, device, dtype)
        for name, shape in SHAPES[shape_set].items()
    }
    result = {
        "device": kind,
        "dtype": str(dtype),
        "tokens": tokens,
        "shapes": {n: m["results"] for n, m in measured.items()},
    }
    extra = {
        "shape_set": shape_set,
        "rank": args.rank,
        "num_sparse": args.num_sparse,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "over_lora_p10_p90": {n: m["spread"] for n, m in measured.items()},
    }
    for key, field in (("not_timed", "failed"), ("peak_gpu_bytes", "peaks"), ("profile", "profile")):
        values = {n: m[field] for n, m in measured.items() if m[field] is not None}
        if values:
            extra[key] = values
    if args.out:
        write_result(args.out, {**result, **extra}, kind)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
