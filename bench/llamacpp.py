"""GGUF exports in llama.cpp (through llama-cpp-python): prompt-processing and generation tokens/s, file size,
peak RSS, for the dense SmolLM2 export and (when given) a structurally pruned one, f16 and q8_0.

    python bench/llamacpp.py --dense /tmp/models-smollm2/smollm2-135m [--pruned runs/s25/final] \
        [--types f16 q8_0] [--prompt-tokens 128 --new-tokens 64 --repeats 3 --threads 2]
    python bench/llamacpp.py --dense DIR --pruned-shape 0.25 0.25   # no trained pruned model at hand

`--pruned-shape HEADS MLP` stands in for a trained structurally pruned model: the dense model pruned with
dsee-s25's settings (that fraction of heads and MLP neurons removed per layer, by `bench/inference.py`'s
`build_smollm2_pair`: a random DSEE update, so its outputs mean nothing; its shapes, and so its size and
speed, are a trained dsee-s25's).

Each model directory is exported with `dsee-dist export DIR --gguf ...` into a temporary folder. Every
measurement runs in a fresh process (so peak RSS is that model's: the process's maximum resident set, Python
and llama.cpp included), alternating the models within each repetition; the median of the repetitions is
reported. Prompt processing: one batch of --prompt-tokens tokens (a fixed E2E-style text, repeated) evaluated
from an empty context; generation: --new-tokens greedy tokens, one evaluation each, after that prompt.

llama.cpp comes from `pip install llama-cpp-python` (built from source: cmake and a C++ compiler; docs/GGUF.md).
Without it the bench prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = (
    "name[The Eagle], eatType[coffee shop], food[Japanese], priceRange[less than £20], customer rating[low], "
    "area[riverside], familyFriendly[yes], near[Burger King]. The Eagle is a coffee shop that serves Japanese food "
)


def measure(gguf: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """One process, one model: prompt-processing and generation tokens/s, peak RSS (run as a child)."""
    import resource

    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=prompt_tokens + new_tokens + 8, n_threads=threads, n_batch=512, verbose=False)
    tokens = llm.tokenize(PROMPT.encode())
    tokens = (tokens * (prompt_tokens // len(tokens) + 1))[:prompt_tokens]
    for _ in range(2):  # warm-up: the prompt's graph and a generation step's
        llm.eval(tokens)
        llm.eval(tokens[:1])
        llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    pp = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    tg = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"pp_tok_s": prompt_tokens / pp, "tg_tok_s": new_tokens / tg, "peak_rss_mib": rss}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    return platform.machine()


def export(model_dir: str, target: Path, gguf_type: str) -> None:
    cmd = [sys.executable, "-m", "dsee_dist", "export", model_dir, "--gguf", str(target), "--gguf-type", gguf_type]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense", required=True, help="the dense model directory (e.g. SmolLM2-135M)")
    parser.add_argument("--pruned", help="a structurally pruned export directory (dsee-s25)")
    parser.add_argument("--pruned-shape", nargs=2, type=float, metavar=("HEADS", "MLP"), help="see above")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=["f32", "f16", "q8_0"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1 on a shared machine (OpenMP waits)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def exported(args, tmp: Path) -> dict[tuple[str, str], Path]:
    """(model, type) -> its GGUF file: every model (dense, --pruned or the --pruned-shape stand-in) in every type."""
    models = {"dense": args.dense, **({"pruned": args.pruned} if args.pruned else {})}
    if args.pruned_shape and not args.pruned:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from inference import build_smollm2_pair

        _, pruned_dir = build_smollm2_pair(Path(args.dense), *args.pruned_shape, tmp / "shape")
        models["pruned-shape"] = str(pruned_dir)
    files = {}
    for name, model_dir in models.items():
        for gguf_type in args.types:
            files[(name, gguf_type)] = tmp / f"{name}-{gguf_type}.gguf"
            export(model_dir, files[(name, gguf_type)], gguf_type)
    return files


def measured_rows(args, files: dict[tuple[str, str], Path]) -> list[dict]:
    """One row per file: its size and the median of --repeats fresh-process measurements (files alternating)."""
    runs = {key: [] for key in files}
    for _ in range(args.repeats):
        for key, path in files.items():  # alternating: every model once per repetition
            child = [sys.executable, __file__, "--dense", args.dense, "--child", str(path)]
            child += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
            child += ["--threads", str(args.threads)]
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            runs[key].append(json.loads(out.strip().splitlines()[-1]))
    return [
        {
            "model": name,
            "type": gguf_type,
            "file_mib": files[(name, gguf_type)].stat().st_size / 2**20,
            **{k: statistics.median(m[k] for m in measured) for k in measured[0]},
        }
        for (name, gguf_type), measured in runs.items()
    ]


def print_table(rows: list[dict]) -> None:
    print(f"{'model':13} {'type':5} {'file MiB':>9} {'pp tok/s':>9} {'tg tok/s':>9} {'peak RSS MiB':>13}")
    for r in rows:
        print(
            f"{r['model']:13} {r['type']:5} {r['file_mib']:9.1f} {r['pp_tok_s']:9.1f} {r['tg_tok_s']:9.1f} "
            f"{r['peak_rss_mib']:13.0f}"
        )
    dense = {r["type"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        if r["model"] != "dense":
            d = dense[r["type"]]
            print(
                f"{r['model']} / dense, {r['type']}: generation {r['tg_tok_s'] / d['tg_tok_s']:.2f}x, prompt "
                f"{r['pp_tok_s'] / d['pp_tok_s']:.2f}x, file {r['file_mib'] / d['file_mib']:.3f}x"
            )


def main() -> int:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.prompt_tokens, args.new_tokens, args.threads)))
        return 0
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp absent: pip install llama-cpp-python (docs/GGUF.md); nothing measured")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = measured_rows(args, exported(args, Path(tmp)))
    device = f"{cpu_name()}, {args.threads} threads"
    print(f"llama-cpp-python {llama_cpp.__version__}; {device}; prompt {args.prompt_tokens}, new {args.new_tokens}")
    print_table(rows)
    if not args.pruned and not args.pruned_shape:
        print("no --pruned model given: the dense rows only")
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "device": device, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
