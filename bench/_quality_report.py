"""The quality table's outputs, rebuilt from every finished row: table.md (one table per decoding),
quality.json (everything: settings, per-seed records, aggregates) and quality.png (BLEU against trainable
parameters and against FLOPs per token)."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench._common import write_json
from bench._quality_rows import ROWS
from dsee_dist.utils.files import atomic_path, write_text_atomic

METRIC_COLUMNS = (
    ("BLEU", "BLEU", 100),
    ("NIST", "NIST", 1),
    ("METEOR", "METEOR", 100),
    ("ROUGE_L", "ROUGE-L", 100),
    ("CIDEr", "CIDEr", 1),
)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(records: list[dict], speeds: dict) -> list[dict]:
    """One entry per (row, decoding): mean and standard deviation over its seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["row"], r["decoding"]), []).append(r)
    order = {name: i for i, name in enumerate(ROWS)}
    out = []
    for (name, decoding), recs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 99))):
        entry = {
            "row": name,
            "decoding": decoding,
            "seeds": [r["seed"] for r in recs],
            "device": recs[0]["device"],
            "trainable_params": recs[0].get("trainable_params"),
            "test_mrs": recs[0]["test_mrs"],
            "flops_per_token": recs[0].get("flops_per_token"),
            "lr": recs[0].get("lr"),
            "steps": recs[0].get("steps"),
            "sparsity": recs[0].get("sparsity"),
        }
        # an unstructured-sparse export: each zero weight is a multiply-add (2 FLOPs per token) a sparse kernel skips
        # (shown from 1 % on: a dense export has a few exact zeros too, e.g. from the GGUF quantisation)
        zeros = (entry["sparsity"] or {}).get("zeros")
        if zeros and entry["flops_per_token"] and 2 * zeros >= 0.01 * entry["flops_per_token"]:
            entry["nonzero_flops_per_token"] = entry["flops_per_token"] - 2 * zeros
        for key, _, _ in METRIC_COLUMNS:
            entry[key] = _mean_std([r["scores"].get(key) for r in recs])
        entry["train_wall_s"] = _mean_std([r.get("train_wall_s") for r in recs])
        entry["train_cpu_s"] = _mean_std([r.get("train_cpu_s") for r in recs])
        entry["peak_rss_mb"] = max((r.get("peak_rss_mb") or 0 for r in recs), default=None) or None
        entry["tokens_per_s"] = _mean_std([speeds.get(f"{r['row']}-s{r['seed']}") for r in recs])
        out.append(entry)
    return out


def _fmt(ms: tuple[float, float | None], scale: float, digits: int) -> str:
    mean, std = ms
    if mean != mean:  # nan
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def markdown(entries: list[dict]) -> str:
    """One Markdown table per decoding (rows decoded differently are never compared in one table)."""
    parts = []
    for decoding in sorted({e["decoding"] for e in entries}):
        rows = [e for e in entries if e["decoding"] == decoding]
        parts.append(f"Decoding: {decoding}; device: {rows[0]['device']}; test MRs: {rows[0]['test_mrs']}\n")
        parts.append(
            "| row | seeds | trainable params | BLEU | NIST | METEOR | ROUGE-L | CIDEr | MFLOPs/token | "
            "greedy tokens/s | train wall s | train CPU s | peak RSS MB | LR |"
        )
        parts.append("|" + " --- |" * 14)
        for e in rows:
            metrics = [_fmt(e[key], scale, 2 if scale == 100 else 3) for key, _, scale in METRIC_COLUMNS]
            flops = f"{e['flops_per_token'] / 1e6:.1f}" if e.get("flops_per_token") else "n/a"
            if e.get("nonzero_flops_per_token"):
                flops += f" ({e['nonzero_flops_per_token'] / 1e6:.1f} nonzero)"
            params = f"{e['trainable_params']:,}" if e.get("trainable_params") is not None else "n/a"
            lr = f"{e['lr']:g}" if e.get("lr") else "-"
            rss = f"{e['peak_rss_mb']:.0f}" if e.get("peak_rss_mb") else "-"
            speed, wall = _fmt(e["tokens_per_s"], 1, 1), _fmt(e["train_wall_s"], 1, 0)
            cpu = _fmt(e["train_cpu_s"], 1, 0)
            parts.append(
                f"| {e['row']} | {len(e['seeds'])} | {params} | "
                + " | ".join(metrics)
                + f" | {flops} | {speed} | {wall} | {cpu} | {rss} | {lr} |"
            )
        parts.append("")
    return "\n".join(parts)


def plot(entries: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    markers = "osD^vP*Xhp<>"
    for decoding in sorted({e["decoding"] for e in entries}):
        rows = [e for e in entries if e["decoding"] == decoding and e["BLEU"][0] == e["BLEU"][0]]
        for i, e in enumerate(rows):
            # one colour and marker per row in both panels, named once in the shared legend (labels written
            # beside the points overlap: the unpruned rows sit within a BLEU of each other)
            style = dict(fmt=markers[i % len(markers)], color=f"C{i % 10}", capsize=3, markersize=7, alpha=0.85)
            mean, std = e["BLEU"]
            yerr = [100 * std] if std else None
            flops = e.get("nonzero_flops_per_token") or e.get("flops_per_token")
            if e.get("trainable_params"):
                axes[0].errorbar([e["trainable_params"]], [100 * mean], yerr=yerr, **style)
            if flops:
                axes[1].errorbar([flops / 1e6], [100 * mean], yerr=yerr, label=f"{e['row']} ({decoding})", **style)
    for ax, label in (
        (axes[0], "trainable parameters"),
        (axes[1], "decoding MFLOPs per token (nonzero weights for a sparse export)"),
    ):
        ax.set_xlabel(label)
        ax.set_ylabel("BLEU")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_title("BLEU vs trainable parameters (base model not shown: 0)")
    axes[1].set_title("BLEU vs FLOPs per token")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7) or 1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(root: Path, records: list[dict], meta: dict) -> dict:
    entries = aggregate(records, meta["speed"]["tokens_per_s"])
    md = markdown(entries)
    write_text_atomic(root / "table.md", md)
    everything = {**meta, "rows": entries, "records": records}
    write_json(root / "quality.json", everything)
    if entries:
        plot(entries, root / "quality.png")
    return {"markdown": md, "entries": entries}
