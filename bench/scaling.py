"""Scaling of DSEE across ranks and nodes: step time, per-rank memory and bytes communicated per step.

    python bench/scaling.py [--n-layer 4 --n-embd 512] [--no-cluster]

Measured in one run, on the same GPT-2 shape and batch per rank (bench/_step_worker.py, collectives
counted by wrapping torch.distributed before DeepSpeed binds them):
- 1 node x 2 ranks (`deepspeed --num_gpus 2`), ZeRO-2 and ZeRO-3: DSEE, PEFT LoRA and full fine-tuning;
  gradient traffic (all-reduce / reduce-scatter bytes per rank per step) and parameter traffic
  (all-gather / broadcast);
- DSEE under ZeRO-3 at 1 rank: per-rank model-state bytes (parameters held + optimizer master copies and
  moments) against 2 ranks, to check base / N + trainable;
- 2 nodes x 1 rank, DSEE, ZeRO-2 and ZeRO-3, on the two-node cluster of tests/cluster (network
  namespaces; needs root and the Slurm packages; skipped with --no-cluster or when unavailable).

Last line: JSON with `grad_traffic_dsee_over_full` per stage (target <= 0.01) and the ZeRO-3 model-state
scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _common import ROOT, worker_result

sys.path.insert(0, str(ROOT))


def measure(ranks: int, method: str, stage: int, shape: list[str], tmp: Path) -> dict:
    result = tmp / f"{method}_z{stage}_r{ranks}.json"
    ds = ROOT / f"configs/ds/zero{stage}_fp32.json"
    args = ["--method", method, "--ds-config", ds, "--count-comm", "--result", result, *shape]
    return worker_result("_step_worker.py", ranks, args, result, f"{method} ZeRO-{stage} x{ranks} failed")


def measure_two_nodes(method: str, stage: int, shape: list[str], tmp: Path) -> dict | None:
    """1 rank on each of two namespace nodes, DeepSpeed --no_ssh; None when the cluster is unavailable."""
    try:
        from tests.cluster.harness import NODES, Cluster, missing_tools
    except ImportError:
        return None
    if os.geteuid() != 0 or missing_tools():
        return None
    from dsee_dist.engine.launcher import free_port, launch_env

    cluster = Cluster(Path(tempfile.mkdtemp(prefix="dsee-scaling-"))).start()
    try:
        hostfile = tmp / "hostfile"
        hostfile.write_text("".join(f"{node} slots=1\n" for node in NODES))
        result = tmp / f"{method}_z{stage}_2nodes.json"
        port = str(free_port())
        env = launch_env(dict(os.environ, PYTHONPATH=str(ROOT)))
        procs = [
            cluster.popen_on(
                node,
                [
                    sys.executable,
                    "-m",
                    "deepspeed.launcher.runner",
                    "--hostfile",
                    str(hostfile),
                    "--no_ssh",
                    "--node_rank",
                    str(i),
                    "--master_addr",
                    NODES["node1"],
                    "--master_port",
                    port,
                    str(ROOT / "bench" / "_step_worker.py"),
                    "--method",
                    method,
                    "--ds-config",
                    str(ROOT / f"configs/ds/zero{stage}_fp32.json"),
                    "--count-comm",
                    "--result",
                    str(result),
                    *shape,
                ],
                env,
                tmp / f"{node}.log",
            )
            for i, node in enumerate(NODES)
        ]
        if any(p.wait(timeout=600) != 0 for p in procs):
            raise SystemExit("two-node run failed: " + (tmp / "node1.log").read_text()[-3000:])
        return json.loads(result.read_text())
    finally:
        cluster.stop()


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-layer", default="4")
    parser.add_argument("--n-embd", default="512")
    parser.add_argument("--seq", default="128")
    parser.add_argument("--steps", default="6")
    parser.add_argument("--no-cluster", action="store_true")
    return parser.parse_args()


def one_node(shape: list[str], tmp: Path) -> dict:
    """1 node x 2 ranks, ZeRO-2 and ZeRO-3: full, lora and dsee, one line each."""
    out = {}
    for stage in (2, 3):
        rows = {m: measure(2, m, stage, shape, tmp) for m in ("full", "lora", "dsee")}
        out[f"zero{stage}"] = rows
        for method, r in rows.items():
            rank0 = r["per_rank"][0]
            print(
                f"[bench] 1x2 ZeRO-{stage} {method:>4}: step {r['median_step_s'] * 1000:7.1f} ms, trainable "
                f"{r['trainable']:>10,}, grad traffic {mib(rank0['grad_bytes_per_step'])}/step, param traffic "
                f"{mib(rank0['param_bytes_per_step'])}/step, model state {mib(rank0['model_state_bytes'])}/rank, "
                f"peak RSS {mib(rank0['peak_rss_bytes'])}",
                flush=True,
            )
    return out


def two_nodes(shape: list[str], tmp: Path) -> dict:
    """2 nodes x 1 rank, dsee, ZeRO-2 and ZeRO-3 (empty, after one line, when the cluster is unavailable)."""
    out = {}
    for stage in (2, 3):
        two = measure_two_nodes("dsee", stage, shape, tmp)
        if two is None:
            print("[bench] 2 nodes x 1 rank: skipped (needs root and slurmctld/slurmd/munge; see tests/cluster)")
            break
        out[f"zero{stage}"] = two
        rank0 = two["per_rank"][0]
        print(
            f"[bench] 2x1 ZeRO-{stage} dsee: step {two['median_step_s'] * 1000:7.1f} ms, grad traffic "
            f"{mib(rank0['grad_bytes_per_step'])}/step, "
            f"param traffic {mib(rank0['param_bytes_per_step'])}/step, "
            f"model state {mib(rank0['model_state_bytes'])}/rank",
            flush=True,
        )
    return out


def report(summary: dict) -> None:
    """The ZeRO-3 model-state line and the JSON line."""
    ratios = {}
    for stage, rows in summary["one_node_two_ranks"].items():
        full = rows["full"]["per_rank"][0]["grad_bytes_per_step"]
        ratios[stage] = {m: rows[m]["per_rank"][0]["grad_bytes_per_step"] / full for m in ("dsee", "lora")}
    one = summary["dsee_zero3_one_rank"]["per_rank"][0]["model_state_bytes"]
    two = summary["one_node_two_ranks"]["zero3"]["dsee"]["per_rank"][0]["model_state_bytes"]
    print(
        f"[bench] DSEE ZeRO-3 model state per rank: {mib(one)} at 1 rank, {mib(two)} at 2 ranks "
        f"(ratio {two / one:.3f}; "
        f"base / N + trainable predicts just over 0.5)"
    )
    step_times = {
        f"1x2_{s}_{m}": round(rows[m]["median_step_s"], 4)
        for s, rows in summary["one_node_two_ranks"].items()
        for m in rows
    }
    step_times |= {f"2x1_{s}_dsee": round(r["median_step_s"], 4) for s, r in summary["two_nodes_one_rank"].items()}
    print(
        json.dumps(
            {
                "grad_traffic_dsee_over_full": {s: round(r["dsee"], 5) for s, r in ratios.items()},
                "grad_traffic_lora_over_full": {s: round(r["lora"], 5) for s, r in ratios.items()},
                "zero3_model_state_bytes_per_rank": {"1": one, "2": two, "ratio": round(two / one, 4)},
                "step_time_s": step_times,
                "per_rank": summary,
            }
        )
    )


def main() -> None:
    args = parse_args()
    shape = ["--n-layer", args.n_layer, "--n-embd", args.n_embd, "--seq", args.seq, "--steps", args.steps]
    shape += ["--warmup", "2"]
    summary: dict = {"one_node_two_ranks": {}, "two_nodes_one_rank": {}}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        summary["one_node_two_ranks"] = one_node(shape, tmp)
        summary["dsee_zero3_one_rank"] = measure(1, "dsee", 3, shape, tmp)
        if not args.no_cluster:
            summary["two_nodes_one_rank"] = two_nodes(shape, tmp)
    report(summary)


if __name__ == "__main__":
    main()
