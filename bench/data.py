"""The data layer at size: tokenisation throughput, a training job's memory as the dataset grows, the cache on a
rerun, and packing's effect on E2E-length examples.

    python bench/data.py --tokenizer /path/to/smollm2 [--sizes 20000,200000] [--out results/data]

1. Generated chat datasets (JSONL; `--sizes` conversations, ~200 tokens each: a system prompt, two user and two
   assistant turns) are tokenised by dsee_dist's own data path (`load_splits`, data.format chat) with
   data.num_proc 2, and 1 for datasets of at most --single-process-up-to conversations (default: every size):
   conversations/s, cache miss and then cache hit (the rerun's preparation time).
2. A 2-rank training job (a tiny Llama with the given tokenizer and its chat template, 3 steps, ZeRO-2,
   data.num_proc 2, the final held-out loss over 2 batches per rank) reads each dataset: peak RSS of the job's
   processes (all ranks together, sampled every 0.2 s) and the wall time to its first logged step, first run
   (cache miss: it tokenises) and rerun (cache hit).
3. Packing on E2E-length examples (the built-in E2E sample as prompt/completion): the same tiny model, 20 steps
   with and without data.packing: tokens/s and padding fraction from the job's metrics.jsonl.

Prints one line per measurement and a JSON summary (also written to OUT/data_bench.json with device, versions,
date and commit). Figures are from the machine it runs on; on a shared machine, say so.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._common import git_commit, package_versions, write_json  # noqa: E402

WORDS = (
    "the restaurant serves food near river city centre price range cheap moderate high family friendly coffee "
    "shop pub rating customer Italian French English Japanese Chinese Indian fast served by a it is and with "
    "located area in of has not"
).split()


def conversation(rng: random.Random) -> dict:
    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    return {
        "messages": [
            {"role": "system", "content": "You describe restaurants."},
            {"role": "user", "content": sentence(25)},
            {"role": "assistant", "content": sentence(35)},
            {"role": "user", "content": sentence(20)},
            {"role": "assistant", "content": sentence(40)},
        ]
    }


def write_chats(path: Path, n: int, seed: int = 0) -> Path:
    if not path.is_file():
        rng = random.Random(seed)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for _ in range(n):
                f.write(json.dumps(conversation(rng)) + "\n")
        tmp.replace(path)
    return path


def tiny_chat_model(tokenizer_dir: str, target: Path, *, hidden_size: int = 64, max_positions: int = 1024) -> Path:
    """A tiny random Llama (seed 0) with the tokenizer (and chat template) of `tokenizer_dir`: memory and time
    measure the data path, not the model (also the tests' chat model, tests/conftest.py)."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def tokenise(model_dir: Path, data: Path, out_dir: Path, num_proc: int) -> tuple[float, int]:
    """(seconds, examples) of dsee_dist's load_splits on `data` (chat), in this process."""
    from dsee_dist.config import load_config
    from dsee_dist.data.dataset import load_splits
    from dsee_dist.models.loading import load_tokenizer

    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            "model.builtin=null",
            f"model.path={model_dir}",
            "data.format=chat",
            f"data.train_path={data}",
            "data.block_size=512",
            f"data.num_proc={num_proc}",
            f"output.dir={out_dir}",
        ],
    )
    tokenizer = load_tokenizer(model_dir)
    start = time.perf_counter()
    train, evals = load_splits(cfg, tokenizer, out_dir)
    return time.perf_counter() - start, len(train) + len(evals)


class PeakRSS:
    """Peak of the summed RSS of a process and its descendants, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.proc, self.interval, self.peak, self._stop = psutil.Process(pid), interval, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return self.peak


def train_job(model_dir: Path, out_dir: Path, overrides: list[str], steps: int) -> dict:
    """A 2-rank CPU training job (dsee_dist.train under the project's launcher): peak RSS, wall time to the
    first logged step, total wall time and its metrics rows."""
    from dsee_dist.engine.launcher import launch_env, training_command

    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), f"output.dir={out_dir}", "model.builtin=null"]
    args += [f"model.path={model_dir}", f"train.max_steps={steps}", "train.log_every_n_steps=1"]
    args += ["train.micro_batch_size=8", "train.warmup_steps=0", "eval.every_n_steps=0", "eval.max_batches=2"]
    args += ["dsee.support=magnitude", "dsee.target_modules=auto", "dsee.fused_slices=[]"]
    args += ["deepspeed.config=configs/ds/zero2_fp32.json"]
    cmd = training_command(2, [*args, *overrides])
    metrics = out_dir / "metrics.jsonl"
    logged_before = len(metrics.read_text().splitlines()) if metrics.is_file() else 0  # a rerun appends
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    rss = PeakRSS(proc.pid)
    first_step = None
    output = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        if first_step is None and metrics.is_file() and len(metrics.read_text().splitlines()) > logged_before:
            first_step = time.perf_counter() - start
        time.sleep(0.1)
    reader.join()
    peak = rss.stop()
    if proc.returncode != 0:
        sys.exit(f"bench/data.py: training job failed:\n{''.join(output)[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()[logged_before:]]
    return {
        "peak_rss_mb": round(peak / 2**20, 1),
        "first_step_s": round(first_step or (time.perf_counter() - start), 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="a model directory with a chat template (SmolLM2's)")
    p.add_argument("--sizes", default="20000,200000", help="conversations per generated dataset")
    p.add_argument("--out", default=str(ROOT / "results" / "data"))
    p.add_argument("--work", default=None, help="where datasets and runs go (default: a temporary directory)")
    p.add_argument(
        "--single-process-up-to",
        type=int,
        default=None,
        help="measure data.num_proc 1 only on datasets of at most this many conversations (default: every size)",
    )
    p.add_argument("--note", default="", help="recorded with the results (e.g. 'machine shared with ...')")
    return p.parse_args()


def dataset_size(model: Path, work: Path, n: int, summary: dict, single_process_up_to: int | None) -> None:
    """1 and 2 for one generated dataset of `n` conversations: tokenisation (miss, hit), then a training job (first
    run, rerun); into `summary`, one line each."""
    data = write_chats(work / f"chats-{n}.jsonl", n)
    for num_proc in (1, 2) if single_process_up_to is None or n <= single_process_up_to else (2,):
        miss, examples = tokenise(model, data, work / f"tok-{n}-{num_proc}", num_proc)
        hit, _ = tokenise(model, data, work / f"tok-{n}-{num_proc}", num_proc)
        entry = {
            "conversations_per_s": round(n / miss, 1),
            "miss_s": round(miss, 1),
            "hit_s": round(hit, 2),
            "hit_over_miss": round(hit / miss, 4),
            "examples": examples,
        }
        summary["tokenise"][f"{n}-np{num_proc}"] = entry
        print(f"tokenise {n} conversations, num_proc {num_proc}: {entry}", flush=True)
    chat = ["data.format=chat", f"data.train_path={data}", "data.block_size=512", "data.num_proc=2"]
    first = train_job(model, work / f"run-{n}", chat, 3)
    rerun = train_job(model, work / f"run-{n}", [*chat, "train.max_steps=6"], 6)
    summary["train"][str(n)] = {
        "peak_rss_mb": first["peak_rss_mb"],
        "first_step_s": first["first_step_s"],
        "rerun_first_step_s": rerun["first_step_s"],
        "rerun_peak_rss_mb": rerun["peak_rss_mb"],
    }
    print(f"train 2 ranks on {n} conversations: {summary['train'][str(n)]}", flush=True)


def packing(model: Path, work: Path) -> dict:
    """3: tokens/s and padding of 20 steps on the E2E sample, padded and packed, one line each."""
    sample = ROOT / "dsee_dist" / "data" / "e2e_sample" / "train.csv"
    out = {}
    for packed in (False, True):
        e2e = ["data.format=e2e", f"data.train_path={sample}", "data.block_size=512"]
        run = train_job(model, work / f"pack-{packed}", [*e2e, f"data.packing={str(packed).lower()}"], 20)
        steps = [r for r in run["rows"] if "loss" in r][2:]  # the first steps warm up
        entry = {
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in steps) / len(steps), 1),
            "processed_tokens_per_s": round(sum(r["processed_tokens_per_s"] for r in steps) / len(steps), 1),
            "padding_fraction": round(sum(r["padding_fraction"] for r in steps) / len(steps), 4),
        }
        out["packed" if packed else "padded"] = entry
        print(f"E2E-length examples, packing={packed}: {entry}", flush=True)
    out["tokens_per_s_ratio"] = round(out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"], 3)
    return out


def main() -> int:
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary: dict = {"sizes": sizes, "single_process_up_to": args.single_process_up_to}
    summary.update(tokenise={}, train={}, packing={})
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        model = tiny_chat_model(args.tokenizer, work / "model")
        for n in sizes:
            dataset_size(model, work, n, summary, args.single_process_up_to)
        if len(sizes) > 1:
            small, large = summary["train"][str(sizes[0])], summary["train"][str(sizes[-1])]
            summary["peak_rss_ratio_largest_over_smallest"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
        summary["packing"] = packing(model, work)
    summary.update(
        device=f"CPU ({os.cpu_count()} cores), 2 ranks",
        versions=package_versions(("torch", "transformers", "datasets")),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        commit=git_commit(),
        note=args.note,
    )
    write_json(Path(args.out) / "data_bench.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "versions"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
