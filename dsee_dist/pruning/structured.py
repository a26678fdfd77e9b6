"""Structured pruning: whole attention heads and MLP neurons removed physically (METHOD.md §3).

Per layer, the lowest-scoring k heads (score: `scores.head_scores`) and the lowest fraction of MLP
neurons (`scores.neuron_scores`) are removed: the q/k/v rows and biases of those heads and the matching
attention-output columns; the c_fc rows and biases and c_proj columns of those neurons. Layer l is
scored and written by rank l % world_size. The low-rank and sparse factors are sliced the same way by
`slice_adapter`, so stage 2 continues from the stage-1 update restricted to what is left.

Output: a model directory whose config is plain GPT-2 (`n_inner`) when only MLP neurons were removed,
or `pruned_gpt2.PrunedGPT2Config` (per-layer heads, fixed head width) with its modeling file copied
alongside for transformers' remote-code loading; plus `dsee_pruning.json` (the plan and the report).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dsee_dist.engine import distributed
from dsee_dist.dsee.adapter import layer_delta
from dsee_dist.errors import ConfigError
from dsee_dist.pruning.model_files import ModelFiles, write_pruned_model
from dsee_dist.pruning.scores import head_scores, lowest, neuron_scores
from dsee_dist.pruning.targets import file_to_out_in, gpt2_shape
from dsee_dist.pruning.unstructured import REPORT_FILE, adapted_slice

REMOTE_CODE_FILE = "modeling_dsee_pruned_gpt2.py"


def heads_to_remove(prune_cfg, n_heads: int) -> int:
    k = prune_cfg.heads_removed or round(prune_cfg.head_ratio * n_heads)
    if k >= n_heads:
        raise ConfigError(f"prune: removing {k} heads per layer leaves none of the model's {n_heads}; "
                          f"remove at most {n_heads - 1} (prune.heads_removed / prune.head_ratio)")
    return k


def neurons_to_remove(prune_cfg, n_inner: int) -> int:
    return round(prune_cfg.mlp_ratio * n_inner)


def _delta_rows(adapter: tuple[dict, dict], module: str, *row_blocks: tuple[int, int]) -> list[torch.Tensor | None]:
    """ΔW of each row block (first, count) of a module where those rows are adapted, else None; the
    module's update is computed once."""
    config, tensors = adapter
    if module not in config["layers"]:
        return [None] * len(row_blocks)
    delta = layer_delta(config, tensors, module)
    return [delta[start:start + n] if adapted_slice(config, module, (start, n)) is not None else None
            for start, n in row_blocks]


def plan_structured(prune_cfg, files: ModelFiles, model_config, adapter: tuple[dict, dict], dist_info, log=print) -> dict:
    """Collective: {"heads_kept": [[...] per layer], "neurons_kept": [[...] per layer]} on every rank."""
    shape = gpt2_shape(model_config)
    hd, d = shape["head_dim"], shape["n_embd"]
    mine = {}
    for layer in range(dist_info.rank, shape["n_layer"], dist_info.world_size):
        prefix = f"transformer.h.{layer}"
        result = {}
        heads, inner = shape["heads"][layer], shape["inner"][layer]
        if heads_to_remove(prune_cfg, heads):
            w = heads * hd
            qkv = file_to_out_in(files.get(files.key(f"{prefix}.attn.c_attn")))
            module = f"{prefix}.attn.c_attn"
            q_delta, v_delta = _delta_rows(adapter, module, (0, w), (2 * w, w))
            result["heads"] = head_scores(qkv[:w], qkv[2 * w:], q_delta, v_delta, hd, prune_cfg.head_score)
        if neurons_to_remove(prune_cfg, inner):
            fc = file_to_out_in(files.get(files.key(f"{prefix}.mlp.c_fc")))
            proj = file_to_out_in(files.get(files.key(f"{prefix}.mlp.c_proj")))
            (fc_delta,) = _delta_rows(adapter, f"{prefix}.mlp.c_fc", (0, inner))
            (proj_delta,) = _delta_rows(adapter, f"{prefix}.mlp.c_proj", (0, d))
            result["neurons"] = neuron_scores(fc, proj, fc_delta, proj_delta, prune_cfg.head_score)
        mine[layer] = result
    scores = {}
    for part in distributed.all_gather_object(mine):
        scores.update(part)
    plan = {"heads_kept": [], "neurons_kept": [], "heads_removed": [], "neurons_removed": []}
    for layer in range(shape["n_layer"]):
        heads, inner = shape["heads"][layer], shape["inner"][layer]
        removed_h = lowest(scores[layer]["heads"], heads_to_remove(prune_cfg, heads)) if "heads" in scores[layer] else []
        removed_n = lowest(scores[layer]["neurons"], neurons_to_remove(prune_cfg, inner)) if "neurons" in scores[layer] else []
        plan["heads_removed"].append(removed_h)
        plan["neurons_removed"].append(removed_n)
        plan["heads_kept"].append([h for h in range(heads) if h not in set(removed_h)])
        plan["neurons_kept"].append([n for n in range(inner) if n not in set(removed_n)])
    plan["head_scores"] = [scores[layer]["heads"].tolist() if "heads" in scores[layer] else None for layer in range(shape["n_layer"])]
    plan["neuron_scores"] = [scores[layer]["neurons"].tolist() if "neurons" in scores[layer] else None
                             for layer in range(shape["n_layer"])]
    return plan


def head_rows(heads_kept: list[int], head_dim: int, width: int, fused: bool) -> torch.Tensor:
    """Kept rows of q/k/v (fused: all three thirds of c_attn) or of one head-wide block."""
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads_kept])
    return torch.cat([rows, rows + width, rows + 2 * width]) if fused else rows


def layer_index_maps(plan: dict, shape: dict, layer: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """module suffix -> (kept output rows, kept input columns) in (out x in) layout; None = all kept."""
    hd = shape["head_dim"]
    width = shape["heads"][layer] * hd
    heads_changed = len(plan["heads_kept"][layer]) != shape["heads"][layer]
    neurons_changed = len(plan["neurons_kept"][layer]) != shape["inner"][layer]
    qkv_rows = head_rows(plan["heads_kept"][layer], hd, width, fused=True) if heads_changed else None
    attn_cols = head_rows(plan["heads_kept"][layer], hd, width, fused=False) if heads_changed else None
    neurons = torch.tensor(plan["neurons_kept"][layer]) if neurons_changed else None
    return {"attn.c_attn": (qkv_rows, None), "attn.c_proj": (None, attn_cols),
            "mlp.c_fc": (neurons, None), "mlp.c_proj": (None, neurons)}


def pruned_config(model_config, plan: dict):
    """Plain GPT-2 with n_inner when every layer keeps all heads and the same MLP width, else PrunedGPT2Config."""
    from dsee_dist.models.pruned_gpt2 import PrunedGPT2Config

    shape = gpt2_shape(model_config)
    heads = [len(h) for h in plan["heads_kept"]]
    inner = [len(n) for n in plan["neurons_kept"]]
    if heads == shape["heads"] and len(set(inner)) == 1 and model_config.model_type == "gpt2":
        config = model_config.__class__.from_dict(model_config.to_dict())
        config.n_inner = inner[0]
        return config
    values = {k: v for k, v in model_config.to_dict().items()
              if k not in ("model_type", "heads_per_layer", "inner_per_layer", "head_dim", "auto_map", "architectures")}
    config = PrunedGPT2Config(heads_per_layer=heads, inner_per_layer=inner, head_dim=shape["head_dim"], **values)
    config.architectures = ["PrunedGPT2LMHeadModel"]
    config.auto_map = {"AutoConfig": f"{REMOTE_CODE_FILE[:-3]}.PrunedGPT2Config",
                       "AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.PrunedGPT2LMHeadModel"}
    return config


def write_remote_code(target_dir: Path) -> None:
    from dsee_dist.models import pruned_gpt2

    shutil.copyfile(pruned_gpt2.__file__, Path(target_dir) / REMOTE_CODE_FILE)


def prune_structured(prune_cfg, base_dir: str, adapter: tuple[dict, dict], target: Path, dist_info, log=print) -> dict:
    """Collective. Writes the physically smaller model to `target`; returns the report (with the plan)."""
    from transformers import AutoConfig

    from dsee_dist.models.pruned_gpt2 import register

    register()
    files = ModelFiles(base_dir)
    model_config = AutoConfig.from_pretrained(base_dir)
    shape = gpt2_shape(model_config)
    for layer in range(shape["n_layer"]):  # refuse impossible requests before any work
        heads_to_remove(prune_cfg, shape["heads"][layer])
    plan = plan_structured(prune_cfg, files, model_config, adapter, dist_info, log)
    n_heads = sum(len(h) for h in plan["heads_removed"])
    n_neurons = sum(len(n) for n in plan["neurons_removed"])
    log(f"prune: removing {n_heads} of {sum(shape['heads'])} attention heads and {n_neurons:,} of "
        f"{sum(shape['inner']):,} MLP neurons (score '{prune_cfg.head_score}')")

    my_tensors, replaced = {}, set()
    for layer in range(shape["n_layer"]):
        for suffix, (rows, cols) in layer_index_maps(plan, shape, layer).items():
            module = f"transformer.h.{layer}.{suffix}"
            if rows is None and cols is None:
                continue
            replaced.update({files.key(module), files.key(module, "bias")})
            if layer % dist_info.world_size != dist_info.rank:
                continue
            w = file_to_out_in(files.get(files.key(module)))
            if rows is not None:
                w = w[rows]
            if cols is not None:
                w = w[:, cols]
            my_tensors[files.key(module)] = w.t().contiguous()
            bias = files.get(files.key(module, "bias"))
            my_tensors[files.key(module, "bias")] = bias[rows] if rows is not None else bias
    config = pruned_config(model_config, plan)
    report = {"method": "structured", "score": prune_cfg.head_score, "plan": plan,
              "heads_removed": n_heads, "neurons_removed": n_neurons,
              "heads_per_layer": [len(h) for h in plan["heads_kept"]], "inner_per_layer": [len(n) for n in plan["neurons_kept"]]}

    def rank_zero_files(tmp: Path) -> None:
        config.save_pretrained(tmp)
        if getattr(config, "auto_map", None):
            write_remote_code(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))

    write_pruned_model(target, files, my_tensors, replaced, rank_zero_files, dist_info)
    return report


def slice_adapter(adapter: tuple[dict, dict], plan: dict, model_config) -> tuple[dict, dict]:
    """The stage-1 adapter restricted to the kept heads and neurons: B rows / A columns sliced, sparse
    entries in removed rows or columns dropped (the rest keep their order and values)."""
    config, tensors = adapter
    config = json.loads(json.dumps(config))
    tensors = dict(tensors)
    shape = gpt2_shape(model_config)
    for name, meta in config["layers"].items():
        parts = name.split(".")
        if len(parts) < 5 or parts[-4] != "h":
            continue
        layer = int(parts[-3])
        rows, cols = layer_index_maps(plan, shape, layer).get(".".join(parts[-2:]), (None, None))
        if rows is None and cols is None:
            continue
        slices = [tuple(s) for s in meta["slices"]]
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        index = tensors[f"{name}.sparse_index"]
        keep_entry = torch.ones(index.shape[1], dtype=torch.bool)
        new_index = index.clone()
        if cols is not None:
            col_map = torch.full((meta["in_features"],), -1, dtype=torch.long)
            col_map[cols] = torch.arange(cols.numel())
            a = a[:, cols]
            keep_entry &= col_map[index[1]] >= 0
            new_index[1] = col_map[index[1]]
            meta["in_features"] = int(cols.numel())
        if rows is not None:
            row_map = torch.full((meta["out_features"],), -1, dtype=torch.long)
            row_map[rows] = torch.arange(rows.numel())
            local_rows = [rows[(rows >= s) & (rows < s + n)] - s for s, n in slices]
            if len({r.numel() for r in local_rows}) != 1:
                raise ValueError(f"{name}: the kept rows differ in number between its slices")
            b = torch.stack([b[i][local] for i, local in enumerate(local_rows)])
            keep_entry &= row_map[index[0]] >= 0
            new_index[0] = row_map[index[0]]
            meta["slices"] = [[int(row_map[rows[(rows >= s) & (rows < s + n)][0]]), int(local_rows[0].numel())] for s, n in slices]
            meta["out_features"] = int(rows.numel())
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a.contiguous(), b.contiguous()
        tensors[f"{name}.sparse_index"] = new_index[:, keep_entry].contiguous()
        if f"{name}.sparse_values" in tensors:
            tensors[f"{name}.sparse_values"] = tensors[f"{name}.sparse_values"][keep_entry].contiguous()
    return config, tensors
