"""The rows of the quality table and the training config each one runs (bench/quality.py).

Every row shares one base config (`base_config`): the same prompt format (the trainer's E2E format,
"MR ||" then " reference<eos>" with the loss on the reference), data order (train.seed), token budget,
schedule, batch and decoding. A row only adds its method, its learning rate and its own keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    """One table row: the method trained, its extra config keys, whether it is trained at all, and the
    method whose learning-rate grid it uses (rows built on dsee reuse dsee's winner)."""

    name: str
    what: str
    method: str | None  # None: the base model, not trained
    overrides: dict = field(default_factory=dict)
    lr_from: str | None = None
    multi_seed: bool = False
    steps_multiple: int = 1  # the row trains this many times the shared step budget (warmup scaled alike)
    # e2e: trained (and decoded) on "MR ||"; chat: the same pairs as conversations through data.format chat, the
    # user turn the instruction + MR (dsee_dist.data.encoding.e2e_chat_messages), decoded with the chat template
    prompt: str = "e2e"


ROWS: dict[str, Row] = {
    r.name: r
    for r in [
        Row("base", "the pretrained model, no tuning, prompted with the raw training format 'MR ||'", None),
        Row(
            "base-chat",
            "the pretrained instruct model, no tuning, prompted as it was trained: its chat template around a "
            "one-line instruction ('Write one sentence describing this restaurant: MR'), greedy",
            None,
            prompt="chat",
        ),
        Row("full", "full fine-tuning", "full", lr_from="full"),
        Row(
            "lora",
            "PEFT LoRA r=8 on q_proj, v_proj (PEFT's own layers, same trainer)",
            "lora",
            lr_from="lora",
            multi_seed=True,
        ),
        Row(
            "dsee",
            "DSEE r=8 + N sparse per matrix on q_proj, v_proj (fast decomposition support)",
            "dsee",
            lr_from="dsee",
            multi_seed=True,
        ),
        Row(
            "dsee-mag",
            "dsee with the magnitude support (the N largest |W0| entries per matrix, the quickstart's choice): "
            "tells the support choice apart from the implementation when set beside supra",
            "dsee",
            {"dsee": {"support": "magnitude"}},
            lr_from="dsee-wide",
            multi_seed=True,
        ),
        Row(
            "dsee-wide",
            "dsee with its learning rate from a grid reaching supra's top point (dsee's grid plus 4e-3): the dsee "
            "row set beside supra, shira and dsee-mag, offered the same learning rates as supra",
            "dsee",
            lr_from="dsee-wide",
            multi_seed=True,
        ),
        Row(
            "supra",
            "PEFT Supertuning's Supra: LoRA r=8 + the largest-|W0| entries on q_proj, v_proj, as many in total as "
            "dsee's N per matrix (one sparsity: shares by matrix size; PEFT's own layers, same trainer)",
            "supra",
            lr_from="supra",
            multi_seed=True,
        ),
        Row(
            "shira",
            "PEFT SHiRA: a random sparse support of LoRA r=8's count, r(in + out) entries per matrix, on q_proj, "
            "v_proj (PEFT's own layers, same trainer)",
            "shira",
            lr_from="shira",
            multi_seed=True,
        ),
        Row(
            "dsee-chat",
            "dsee trained through data.format chat: the same pairs as conversations (user = the instruction + MR, "
            "assistant = the reference, loss on the assistant turn), decoded with the chat template; same steps, "
            "seed and learning rate as dsee",
            "dsee",
            lr_from="dsee",
            prompt="chat",
        ),
        Row(
            "dsee-ref",
            "dsee, support from the reference decomposition loop",
            "dsee",
            {"dsee": {"decomposition": {"algorithm": "reference"}}},
            lr_from="dsee",
        ),
        Row(
            "dsee-u50",
            "dsee, then 50 % unstructured pruning of every block matrix (attention and MLP) by |W0 + dW| times the "
            "input's calibration norm, half of every output row (as configs/smollm2_e2e_unstructured50.yaml), "
            "re-tuned, sparse export",
            "dsee",
            {"prune": {"method": "unstructured", "score": "activation", "ratio": 0.5, "grouping": "row"}},
            lr_from="dsee",
            multi_seed=True,
        ),
        Row(
            "dsee-s25",
            "dsee, then 25 % of attention heads (GQA-aware) and 25 % of MLP neurons removed by what they write "
            "(output-projection columns x calibration input norm), re-tuned, physically smaller export",
            "dsee",
            {
                "prune": {
                    "method": "structured",
                    "uniform_per_layer": True,
                    "head_ratio": 0.25,
                    "mlp_ratio": 0.25,
                    "head_score": "activation",
                }
            },
            lr_from="dsee",
            multi_seed=True,
        ),
        Row(
            "dsee-2x",
            "dsee trained for twice the steps: as many optimizer steps as a pruned row's two stages, the control "
            "for their longer training (one schedule, warmup 10 % as every row)",
            "dsee",
            lr_from="dsee",
            multi_seed=True,
            steps_multiple=2,
        ),
    ]
}

# Learning-rate grids, chosen on the held-out MRs (lowest held-out loss). Defaults are used without a grid.
# A grid key is a row name; its points are trained as that row, in grid/<method>-lr<lr> when the row is its
# method's plain config (so dsee-wide's points are dsee's). supra's LoRA part is lora's (whose winner was its
# grid's upper edge, 2e-3), so its grid is one step higher; dsee-wide is dsee's grid plus that 4e-3, so that
# the rows set beside supra are offered the same learning rates (dsee's 2e-3 had also won at the edge; dsee
# and lora keep their own grid: the lora comparison and the pruning rows' stage 1 are at 2e-3); shira's entries
# are added unscaled (scale 1) where dsee's are scaled by alpha / r: a wider grid around 1e-3.
LR_GRID = {
    "full": [2e-5, 5e-5, 1e-4],
    "lora": [5e-4, 1e-3, 2e-3],
    "dsee": [5e-4, 1e-3, 2e-3],
    "supra": [1e-3, 2e-3, 4e-3],
    "shira": [2e-4, 1e-3, 5e-3],
}
LR_GRID["dsee-wide"] = LR_GRID["dsee"] + [max(LR_GRID["supra"])]
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "dsee": 1e-3, "supra": 2e-3, "shira": 1e-3}
DEFAULT_LR["dsee-wide"] = DEFAULT_LR["dsee"]
LORA_RANK, LORA_ALPHA = 8, 16.0
CHAT_BLOCK_SIZE = 192  # the e2e rows' 128 plus the chat template's system prompt, role markers and instruction
SEEDS = (42, 43, 44)


def family_targets(model_type: str) -> tuple[list[str], list[str]]:
    """(target_modules, fused_slices) for q and v of the model's family."""
    if model_type == "gpt2":
        return ["c_attn"], ["q", "v"]
    return ["q_proj", "v_proj"], []


def adapted_shapes(model_dir: str) -> list[tuple[int, int]]:
    """(rows, in_features) of every adapted q/v matrix, read from the model on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsee_dist.dsee.inject import find_targets
    from dsee_dist.dsee.layer import slice_rows

    config = AutoConfig.from_pretrained(model_dir)
    targets, fused = family_targets(config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = []
    for spec in find_targets(model, targets, fused):
        shapes += [(len(slice_rows(s)), spec.in_features) for s in spec.slices]
    return shapes


def sparse_budget(shapes: list[tuple[int, int]], rank: int, tolerance: float = 0.05) -> dict:
    """N sparse entries per matrix such that DSEE's trainable count (LoRA's r(in + out) per matrix plus N)
    is within `tolerance` of LoRA's: the largest N with N * matrices <= tolerance * lora."""
    lora = sum(rank * (rows + cols) for rows, cols in shapes)
    n = math.floor(tolerance * lora / len(shapes))
    dsee = lora + n * len(shapes)
    return {"num_sparse": n, "matrices": len(shapes), "lora_params": lora, "dsee_params": dsee, "ratio": dsee / lora}


def adapter_section(num_sparse: int, **extra) -> dict:
    """The `dsee:` section every benchmark row shares: rank 8, alpha 16, no dropout, the decomposition support
    with `num_sparse` entries per matrix (0: LoRA alone), plus `extra` keys (the targets)."""
    return {
        "lora_rank": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "num_sparse": num_sparse,
        "support": "decomposition",
        **extra,
    }


def base_config(
    *,
    model_dir: str,
    train_csv: str,
    eval_csv: str,
    out_dir: str,
    budget: dict,
    seed: int,
    lr: float,
    method: str,
    num_sparse: int,
    model_type: str,
    gpu: bool,
) -> dict:
    """The shared training config of every row (a plain dict, written as the row's YAML)."""
    targets, fused = family_targets(model_type)
    train = {
        "seed": seed,
        "lr": lr,
        "weight_decay": 0.0,
        "schedule": "linear",
        "grad_clip": 1.0,
        "micro_batch_size": budget["micro_batch_size"],
        "grad_accum_steps": budget["grad_accum_steps"],
        "warmup_steps": budget["warmup_steps"],
        "log_every_n_steps": 10,
        "max_steps": 0,
        "epochs": 0.0,
    }
    if budget.get("max_steps"):
        train["max_steps"] = budget["max_steps"]
    else:
        train["epochs"] = budget["epochs"]
    return {
        "method": method,
        "model": {"path": model_dir, "dropout": 0.0},
        "data": {
            "format": "e2e",
            "train_path": train_csv,
            "eval_path": eval_csv,
            "block_size": 128,
            "max_eval_examples": budget.get("max_eval_examples", 0),
        },
        "dsee": adapter_section(num_sparse, target_modules=targets, fused_slices=fused),
        "train": train,
        "eval": {"every_n_steps": 0, "micro_batch_size": 16},
        "output": {"dir": out_dir},
        "checkpoint": {"every": 0, "keep_last": 1},
        "deepspeed": {"config": str(REPO / "configs" / "ds" / ("zero2_bf16.json" if gpu else "zero0_fp32.json"))},
        "resume": "auto",
    }


def row_config(row: Row, **kw) -> dict:
    """The base config with the row's method and keys; pruning rows re-tune as long as stage 1 trained."""
    from dsee_dist.config import merge_nested

    if row.steps_multiple != 1:
        budget = kw["budget"]
        kw["budget"] = {
            **budget,
            "max_steps": budget["max_steps"] * row.steps_multiple,
            "warmup_steps": budget["warmup_steps"] * row.steps_multiple,
        }
    cfg = base_config(method=row.method, **kw)
    cfg = merge_nested(cfg, row.overrides)
    if row.prompt == "chat":  # the same pairs, as conversations (bench/quality.py writes them beside the CSVs)
        data = cfg["data"]
        data.update(
            format="chat",
            train_path=str(Path(data["train_path"]).with_suffix(".chat.jsonl")),
            eval_path=str(Path(data["eval_path"]).with_suffix(".chat.jsonl")),
            block_size=CHAT_BLOCK_SIZE,
        )
    if "prune" in row.overrides:
        train = cfg["train"]
        cfg["prune"].update(
            {"retrain_steps": train["max_steps"], "retrain_epochs": train["epochs"], "retrain_lr": train["lr"]}
        )
    return cfg
