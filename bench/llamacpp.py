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

With `--score-mrs N` and a trained `--pruned` model, the first N MRs of the E2E test set are decoded greedily
from that model's training prompt (`MR ||`) by llama.cpp from each GGUF type and by transformers from the
directory (the quality table's decoding), on the same token ids, stopping at the same tokens (EOS or any token
with a newline), and scored by `dsee-dist evaluate`'s E2E figures; the outputs are written beside the JSON.
`--out DIR` writes llamacpp.json (rows, scores, device, versions, date, commit).

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
sys.path.insert(0, str(REPO))
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


def greedy_outputs(gguf: Path, model_dir: str, mrs: list[str], max_new_tokens: int, threads: int) -> list[str]:
    """llama.cpp's greedy outputs for the MRs' training prompts: the token ids transformers decodes from (the model's
    tokenizer, no special tokens added), the argmax of llama.cpp's logits at each step, the same stop tokens, the
    same cleaning (dsee_dist.eval.decoding)."""
    import numpy as np
    from llama_cpp import Llama

    from dsee_dist.eval.decoding import clean_output, stop_token_ids
    from dsee_dist.models.loading import load_tokenizer
    from dsee_dist.recipes.generate import e2e_prompts

    tokenizer = load_tokenizer(model_dir)
    stops = set(stop_token_ids(tokenizer, stop_at_newline=True))
    prompts = tokenizer(e2e_prompts(tokenizer, mrs), add_special_tokens=False)["input_ids"]
    n_ctx = max(map(len, prompts)) + max_new_tokens + 8
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, logits_all=True, verbose=False)
    outputs = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        new: list[int] = []
        while len(new) < max_new_tokens:
            new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if new[-1] in stops:
                break
            llm.eval(new[-1:])
        outputs.append(clean_output(tokenizer.decode(new, skip_special_tokens=True)) or "-")
    return outputs


def scored_decodes(args, files: dict[tuple[str, str], Path], out: Path | None) -> dict:
    """E2E figures of the pruned model's first --score-mrs test MRs: transformers' greedy decode and llama.cpp's
    from every GGUF type, with the share of outputs identical to transformers'."""
    import torch

    from bench._quality_decode import decode_mrs, load_decoder
    from dsee_dist.eval.metrics import score_e2e
    from dsee_dist.eval.references import read_references

    refs = read_references(args.test_csv)
    mrs, groups = refs.mrs[: args.score_mrs], refs.groups[: args.score_mrs]
    model, tokenizer = load_decoder(args.pruned, "cpu", torch.float32)
    decoded = {"transformers fp32": decode_mrs(model, tokenizer, mrs, "greedy", batch_size=16)[0]}
    del model
    for gguf_type in args.types:
        decoded[f"llama.cpp {gguf_type}"] = greedy_outputs(
            files[("pruned", gguf_type)], args.pruned, mrs, 64, args.threads
        )
    scores = {}
    for name, outputs in decoded.items():
        same = sum(a == b for a, b in zip(outputs, decoded["transformers fp32"])) / len(mrs)
        scores[name] = {**score_e2e(outputs, groups), "identical_to_transformers": round(same, 3)}
        if out is not None:
            (out / f"outputs-{name.replace(' ', '-')}.txt").write_text("\n".join(outputs) + "\n")
        print(f"{name}: {scores[name]}", flush=True)
    return {"mrs": len(mrs), "test_csv": str(args.test_csv), "scores": scores}


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
    parser.add_argument("--score-mrs", type=int, default=0, help="decode and score the first N test MRs (--pruned)")
    parser.add_argument("--test-csv", default=str(REPO.parent / "shared" / "data" / "e2e" / "testset_w_refs.csv"))
    parser.add_argument("--out", help="write llamacpp.json (and the scored outputs) into this directory")
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
    if args.score_mrs and not args.pruned:
        print("bench/llamacpp.py: --score-mrs scores a trained --pruned model; give --pruned DIR", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = exported(args, Path(tmp))
        rows = measured_rows(args, files)
        scored = scored_decodes(args, files, out) if args.score_mrs else None
    device = f"{cpu_name()}, {args.threads} threads"
    print(f"llama-cpp-python {llama_cpp.__version__}; {device}; prompt {args.prompt_tokens}, new {args.new_tokens}")
    print_table(rows)
    if not args.pruned and not args.pruned_shape:
        print("no --pruned model given: the dense rows only")
    result = {"llama_cpp_python": llama_cpp.__version__, "device": device, "rows": rows, "decodes": scored}
    if out is not None:
        from bench._common import git_commit, package_versions, write_json

        settings = {k: v for k, v in vars(args).items() if k != "child"}
        write_json(
            out / "llamacpp.json",
            {
                **result,
                "settings": settings,
                "versions": package_versions(),
                "commit": git_commit(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            },
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
