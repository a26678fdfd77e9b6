"""Structured pruning: whole attention heads and MLP neurons removed physically (METHOD.md §3), for every
family whose config can express the smaller model (dsee_dist.models.families).

Per layer, the lowest-scoring heads (score: `scores.head_scores`) and the lowest fraction of MLP neurons
(`scores.neuron_scores`; with `head_score: activation` both by `scores.output_column_scores` over the
calibration norms, `calibration_modules`) are removed: the q/k/v rows and biases of those heads and the matching
attention-output columns; the MLP input rows (and SwiGLU gate rows) and biases and the output columns of
those neurons. Layer l is scored and written by rank l % world_size. The low-rank and sparse factors are
sliced the same way by `slice_adapter`, so stage 2 continues from the stage-1 update restricted to what
is left.

Grouped-query attention (Llama, Mistral, Qwen2 with num_key_value_heads < num_attention_heads): the same
number of query heads is removed from every KV group and every key/value head is kept, so the KV sharing
stays valid and the model stays expressible as num_attention_heads = kv_heads * (group - m). Removing
whole KV groups instead would also drop the key/value rows that several query heads share (the largest
loss per head removed) and cannot go below one group. Without GQA (one query head per KV head) a head is
its own group and is removed with its key and value rows, as in GPT-2.

Per-layer counts (`prune.uniform_per_layer`, default true): the same number of heads and neurons leaves
every layer, so a Llama-family export is a stock LlamaConfig (num_attention_heads, num_key_value_heads,
head_dim set explicitly, intermediate_size) and loads with plain transformers. `false` ranks heads and
neurons over all layers at once; only GPT-2 can write such a model (`pruned_gpt2.PrunedGPT2Config`,
per-layer heads, its modeling file copied alongside for remote-code loading).

Output: the model directory plus `dsee_pruning.json` (the plan and the report).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import torch

from dsee_dist.config.schema import HEAD_ROUNDINGS
from dsee_dist.dsee.adapter import layer_delta
from dsee_dist.dsee.layer import row_slots, slice_rows
from dsee_dist.engine import process_group
from dsee_dist.errors import ConfigError
from dsee_dist.models.shape import ModelShape, model_shape
from dsee_dist.pruning.model_files import ModelFiles, write_pruned_model
from dsee_dist.pruning.scores import head_scores, lowest, neuron_scores, output_column_scores
from dsee_dist.pruning.targets import file_to_out_in, module_name
from dsee_dist.pruning.unstructured import REPORT_FILE, adapted_slice

logger = logging.getLogger(__name__)
REMOTE_CODE_FILE = "modeling_dsee_pruned_gpt2.py"


def uniform_per_layer(prune_cfg) -> bool:
    return bool(getattr(prune_cfg, "uniform_per_layer", True))


def group_size(shape: ModelShape, layer: int) -> int:
    return shape.heads[layer] // shape.kv_heads[layer]


def round_heads(count: float, how: str) -> int:
    """A fractional head count as whole heads: `nearest` is Python's round (halves to even: 0.5 -> 0, 1.5 -> 2),
    `down` and `up` floor and ceil (1e-9 absorbs float error: 0.3 x 10 = 3.0000000000000004 is 3)."""
    if how == "down":
        return math.floor(count + 1e-9)
    if how == "up":
        return math.ceil(count - 1e-9)
    return round(count)


def heads_to_remove(prune_cfg, n_heads: int, n_kv_heads: int | None = None) -> int:
    """Query heads removed from a layer of n_heads (n_kv_heads KV groups); a multiple of n_kv_heads under GQA.
    From head_ratio: head_ratio x n_heads rounded by prune.head_rounding, or under GQA head_ratio x the query
    heads of one KV group, rounded, from every group."""
    n_kv = n_kv_heads or n_heads
    group = n_heads // n_kv
    if group == 1:
        k = prune_cfg.heads_removed or round_heads(prune_cfg.head_ratio * n_heads, prune_cfg.head_rounding)
    elif prune_cfg.heads_removed:
        k = prune_cfg.heads_removed
        if k % n_kv:
            raise ConfigError(
                f"prune.heads_removed={k}: this model shares each of its {n_kv} key/value heads between "
                f"{group} query heads, and heads are removed in equal numbers from every KV group; "
                f"use a multiple of {n_kv}"
            )
    else:
        k = round_heads(prune_cfg.head_ratio * group, prune_cfg.head_rounding) * n_kv
    if k >= n_heads or (group > 1 and k // n_kv >= group):
        raise ConfigError(
            f"prune: removing {k} heads per layer leaves none of the model's {n_heads}; "
            f"remove at most {n_heads - max(n_kv if group > 1 else 1, 1)} (prune.heads_removed / "
            f"prune.head_ratio)"
        )
    return k


def describe_head_request(prune_cfg, shape: ModelShape) -> str | None:
    """One line: the heads head_ratio asks for against those removed, and why they differ (whole heads; under
    GQA, the same whole number from every KV group), with what the other roundings would remove. None when
    head_ratio is not used."""
    ratio, how = prune_cfg.head_ratio, prune_cfg.head_rounding
    if not ratio:
        return None
    if not uniform_per_layer(prune_cfg):
        requested = ratio * sum(shape.heads)
        return (
            f"prune: heads: head_ratio {ratio:g} of {sum(shape.heads)} heads over all layers asks for "
            f"{requested:g}; removing {round_heads(requested, how)} (whole heads, rounded {how})"
        )
    n_heads, n_kv = shape.heads[0], shape.kv_heads[0]
    group = n_heads // n_kv
    k = heads_to_remove(prune_cfg, n_heads, n_kv)
    requested = ratio * n_heads
    if group > 1:
        why = (
            f"heads leave each of the {n_kv} KV groups of {group} query heads equally: {ratio:g} x {group} = "
            f"{ratio * group:g} per group, rounded {how} to {k // n_kv}"
        )
    else:
        why = f"whole heads: {requested:g} rounded {how}"
    others = ", ".join(
        f"{other}: {heads_to_remove_with(prune_cfg, other, n_heads, n_kv)}" for other in HEAD_ROUNDINGS if other != how
    )
    return (
        f"prune: heads: head_ratio {ratio:g} of {n_heads} heads per layer asks for {requested:g}; removing {k} "
        f"({why}); prune.head_rounding would remove {others}"
    )


def heads_to_remove_with(prune_cfg, how: str, n_heads: int, n_kv: int) -> int | str:
    """What heads_to_remove gives with prune.head_rounding = `how` ('none left' where it would refuse)."""
    try:
        return heads_to_remove(dataclasses.replace(prune_cfg, head_rounding=how), n_heads, n_kv)
    except ConfigError:
        return "none left (refused)"


def neurons_to_remove(prune_cfg, n_inner: int) -> int:
    return round(prune_cfg.mlp_ratio * n_inner)


def check_structured_request(prune_cfg, model_config) -> ModelShape:
    """Refuse what the family's config cannot express, before any work (ConfigError)."""
    shape = model_shape(model_config, purpose="structured pruning")
    family = shape.family
    removes_heads = any(heads_to_remove(prune_cfg, shape.heads[i], shape.kv_heads[i]) for i in range(shape.n_layer))
    removes_neurons = any(neurons_to_remove(prune_cfg, shape.inner[i]) for i in range(shape.n_layer))
    if uniform_per_layer(prune_cfg) and not (removes_heads or removes_neurons):
        heads = describe_head_request(prune_cfg, shape)
        raise ConfigError(
            "structured pruning would remove nothing from this model"
            + (f" ({heads.removeprefix('prune: heads: ')})" if heads else "")
            + "; raise prune.head_ratio or prune.mlp_ratio, or set prune.head_rounding=up"
        )
    if removes_heads and family.structured_config is None:
        raise ConfigError(
            f"structured pruning of attention heads is not available for {family.name} models: their "
            f"config fixes head_dim = hidden_size / num_heads; prune MLP neurons only (prune.mlp_ratio, "
            f"prune.head_ratio=0) or use unstructured pruning"
        )
    if not uniform_per_layer(prune_cfg) and family.structured_config != "gpt2":
        raise ConfigError(
            f"prune.uniform_per_layer=false gives every layer its own head count and MLP width, which "
            f"a stock {family.name} config cannot express; set prune.uniform_per_layer=true"
        )
    if not uniform_per_layer(prune_cfg) and any(group_size(shape, i) > 1 for i in range(shape.n_layer)):
        raise ConfigError("prune.uniform_per_layer=false is not available with grouped-query attention")
    if uniform_per_layer(prune_cfg) and family.structured_config == "llama":  # the export's config must validate
        k = heads_to_remove(prune_cfg, shape.heads[0], shape.kv_heads[0])
        m = neurons_to_remove(prune_cfg, shape.inner[0])
        kv = shape.kv_heads[0] if group_size(shape, 0) > 1 else shape.heads[0] - k
        counts = {
            "heads_kept": [list(range(shape.heads[0] - k))] * shape.n_layer,
            "kv_heads_kept": [list(range(kv))] * shape.n_layer,
            "neurons_kept": [list(range(shape.inner[0] - m))] * shape.n_layer,
        }
        pruned_config(model_config, counts)
    return shape


def _delta_rows(adapter: tuple[dict, dict], module: str, *row_sets: tuple) -> list[torch.Tensor | None]:
    """ΔW of each row set of a module where those rows are adapted, else None; the module's update is
    computed once."""
    config, tensors = adapter
    if module not in config["layers"]:
        return [None] * len(row_sets)
    delta = layer_delta(config, tensors, module)
    return [delta[slice_rows(rows)] if adapted_slice(config, module, rows) is not None else None for rows in row_sets]


def _weight(files: ModelFiles, module: str, conv1d: bool) -> torch.Tensor:
    return file_to_out_in(files.get(files.key(module)), conv1d)


def calibration_modules(model_config) -> list[str]:
    """The modules whose input norms `head_score: activation` needs: every layer's attention-output and
    MLP-output projections (what a head and a neuron write through)."""
    shape = model_shape(model_config)
    family = shape.family
    return [module_name(shape, layer, rel) for layer in range(shape.n_layer) for rel in (family.o, family.mlp_out)]


def _output_scores(files: ModelFiles, shape: ModelShape, adapter, input_norms: dict, layer: int, relative: str, width):
    module = module_name(shape, layer, relative)
    (delta,) = _delta_rows(adapter, module, (0, shape.hidden))
    return output_column_scores(_weight(files, module, shape.family.conv1d), delta, input_norms[module], width)


def _layer_scores(prune_cfg, files: ModelFiles, shape: ModelShape, adapter, layer: int, input_norms) -> dict:
    family = shape.family
    result = {}
    activation = prune_cfg.head_score == "activation"
    heads = heads_to_remove(prune_cfg, shape.heads[layer], shape.kv_heads[layer]) or not uniform_per_layer(prune_cfg)
    inner = shape.inner[layer]
    if heads and activation:
        result["heads"] = _output_scores(files, shape, adapter, input_norms, layer, family.o, shape.head_dim)
    elif heads:
        rows = shape.qkv_rows(layer)
        q_module, v_module = (module_name(shape, layer, family.q), module_name(shape, layer, family.v))
        q_w, v_w = _weight(files, q_module, family.conv1d), _weight(files, v_module, family.conv1d)
        (q_delta,) = _delta_rows(adapter, q_module, rows["attn_q"])
        (v_delta,) = _delta_rows(adapter, v_module, rows["attn_v"])
        result["heads"] = head_scores(
            q_w[slice_rows(rows["attn_q"])],
            v_w[slice_rows(rows["attn_v"])],
            q_delta,
            v_delta,
            shape.head_dim,
            prune_cfg.head_score,
            group=group_size(shape, layer),
        )
    neurons = neurons_to_remove(prune_cfg, inner)
    if neurons and activation:
        result["neurons"] = _output_scores(files, shape, adapter, input_norms, layer, family.mlp_out, 1)
    elif neurons:
        ins = [module_name(shape, layer, m) for m in (family.mlp_in, family.mlp_gate) if m]
        out = module_name(shape, layer, family.mlp_out)
        rows_in = [(_weight(files, m, family.conv1d), *_delta_rows(adapter, m, (0, inner))) for m in ins]
        (out_delta,) = _delta_rows(adapter, out, (0, shape.hidden))
        result["neurons"] = neuron_scores(
            rows_in[0][0],
            _weight(files, out, family.conv1d),
            rows_in[0][1],
            out_delta,
            prune_cfg.head_score,
            extra_rows=rows_in[1:],
        )
    return result


def _removed_heads(scores: torch.Tensor, k: int, group: int) -> list[int]:
    """The k lowest query heads; under GQA k / n_kv of them from every group of `group` consecutive heads."""
    if group == 1:
        return lowest(scores, k)
    n_kv = scores.numel() // group
    per_group = k // n_kv
    return sorted(g * group + h for g in range(n_kv) for h in lowest(scores[g * group : (g + 1) * group], per_group))


def _global_lowest(per_layer: list[torch.Tensor], k: int) -> list[list[int]]:
    """The k lowest entries over all layers (ties by layer, then index), each layer keeping at least one."""
    order = sorted(((float(s[i]), layer, i) for layer, s in enumerate(per_layer) for i in range(s.numel())))
    removed: list[list[int]] = [[] for _ in per_layer]
    for _, layer, i in order:
        if k <= 0:
            break
        if len(removed[layer]) < per_layer[layer].numel() - 1:
            removed[layer].append(i)
            k -= 1
    return [sorted(r) for r in removed]


def plan_structured(
    prune_cfg, files: ModelFiles, model_config, adapter: tuple[dict, dict], dist_info, input_norms=None
) -> dict:
    """Collective: {"heads_kept": [[...] per layer], "neurons_kept": [[...] per layer], ...} on every rank.
    `input_norms` (module name -> (in,) norms of `calibration_modules`): required by head_score activation."""
    if prune_cfg.head_score == "activation" and input_norms is None:
        raise ValueError("head_score 'activation' needs the calibration norms of calibration_modules(config)")
    shape = model_shape(model_config)
    mine = {
        layer: _layer_scores(prune_cfg, files, shape, adapter, layer, input_norms)
        for layer in range(dist_info.rank, shape.n_layer, dist_info.world_size)
    }
    scores = {}
    for part in process_group.all_gather_object(mine):
        scores.update(part)
    layers = range(shape.n_layer)
    if uniform_per_layer(prune_cfg):
        removed_h = [
            _removed_heads(
                scores[i]["heads"], heads_to_remove(prune_cfg, shape.heads[i], shape.kv_heads[i]), group_size(shape, i)
            )
            if "heads" in scores[i]
            else []
            for i in layers
        ]
        removed_n = [
            lowest(scores[i]["neurons"], neurons_to_remove(prune_cfg, shape.inner[i])) if "neurons" in scores[i] else []
            for i in layers
        ]
    else:  # one ranking over all layers (GPT-2 without GQA only; see check_structured_request)
        k_heads = prune_cfg.heads_removed * shape.n_layer or round_heads(
            prune_cfg.head_ratio * sum(shape.heads), prune_cfg.head_rounding
        )
        removed_h = _global_lowest([scores[i]["heads"] for i in layers], k_heads)
        removed_n = (
            _global_lowest([scores[i]["neurons"] for i in layers], round(prune_cfg.mlp_ratio * sum(shape.inner)))
            if all("neurons" in scores[i] for i in layers)
            else [[] for _ in layers]
        )
    plan = {
        "heads_removed": removed_h,
        "neurons_removed": removed_n,
        "heads_kept": [[h for h in range(shape.heads[i]) if h not in set(removed_h[i])] for i in layers],
        "neurons_kept": [[n for n in range(shape.inner[i]) if n not in set(removed_n[i])] for i in layers],
    }
    plan["kv_heads_kept"] = [kept_kv_heads(shape, plan, i) for i in layers]
    plan["head_scores"] = [scores[i]["heads"].tolist() if "heads" in scores[i] else None for i in layers]
    plan["neuron_scores"] = [scores[i]["neurons"].tolist() if "neurons" in scores[i] else None for i in layers]
    return plan


def kept_kv_heads(shape: ModelShape, plan: dict, layer: int) -> list[int]:
    """Every KV head under GQA; without it, the kept heads themselves."""
    if group_size(shape, layer) > 1:
        return list(range(shape.kv_heads[layer]))
    return list(plan["heads_kept"][layer])


def head_rows(heads_kept: list[int], head_dim: int) -> torch.Tensor:
    """Rows of the kept heads in a head-major block of rows (q, k or v)."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads_kept])


def layer_index_maps(
    plan: dict, shape: ModelShape, layer: int
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """module name relative to the block -> (kept output rows, kept input columns) in (out x in) layout;
    None = all kept."""
    family, hd = shape.family, shape.head_dim
    maps: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    if len(plan["heads_kept"][layer]) != shape.heads[layer]:
        q_rows = head_rows(plan["heads_kept"][layer], hd)
        kv_rows = head_rows(plan["kv_heads_kept"][layer], hd)
        if family.fused_qkv == "blocked":
            qw, kw = shape.q_width(layer), shape.kv_width(layer)
            maps[family.q] = (torch.cat([q_rows, kv_rows + qw, kv_rows + qw + kw]), None)
        elif family.fused_qkv is None:
            maps[family.q] = (q_rows, None)
            if kv_rows.numel() != shape.kv_width(layer):
                maps[family.k] = (kv_rows, None)
                maps[family.v] = (kv_rows, None)
        else:
            raise ConfigError(f"structured head pruning is not available for {family.name} models")
        maps[family.o] = (None, q_rows)
    if len(plan["neurons_kept"][layer]) != shape.inner[layer]:
        neurons = torch.tensor(plan["neurons_kept"][layer])
        for relative in (family.mlp_in, family.mlp_gate):
            if relative:
                maps[relative] = (neurons, None)
        maps[family.mlp_out] = (None, neurons)
    return maps


def pruned_config(model_config, plan: dict):
    """The config of the pruned model: the family's own class wherever it can express the counts (GPT-2
    n_inner; Llama-family num_attention_heads / num_key_value_heads / head_dim / intermediate_size; OPT
    ffn_dim; GPT-NeoX intermediate_size), else PrunedGPT2Config (GPT-2 with per-layer heads)."""
    from dsee_dist.models.pruned_gpt2 import PrunedGPT2Config

    shape = model_shape(model_config)
    family = shape.family
    heads = [len(h) for h in plan["heads_kept"]]
    kv_heads = [len(h) for h in plan["kv_heads_kept"]]
    inner = [len(n) for n in plan["neurons_kept"]]
    config = model_config.__class__.from_dict(model_config.to_dict())
    if family.structured_config == "gpt2" and (
        heads != list(shape.heads) or len(set(inner)) > 1 or model_config.model_type != "gpt2"
    ):
        values = {
            k: v
            for k, v in model_config.to_dict().items()
            if k not in ("model_type", "heads_per_layer", "inner_per_layer", "head_dim", "auto_map", "architectures")
        }
        config = PrunedGPT2Config(heads_per_layer=heads, inner_per_layer=inner, head_dim=shape.head_dim, **values)
        config.architectures = ["PrunedGPT2LMHeadModel"]
        config.auto_map = {
            "AutoConfig": f"{REMOTE_CODE_FILE[:-3]}.PrunedGPT2Config",
            "AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.PrunedGPT2LMHeadModel",
        }
        return config
    if len(set(heads)) > 1 or len(set(inner)) > 1 or len(set(kv_heads)) > 1:
        raise ConfigError(
            f"the pruned {family.name} model has different counts per layer, which its config cannot "
            f"express; set prune.uniform_per_layer=true"
        )
    setattr(config, family.inner_key or "n_inner", inner[0])
    if heads[0] != shape.heads[0]:
        setattr(config, family.heads_key, heads[0])
        if family.kv_heads_key:
            setattr(config, family.kv_heads_key, kv_heads[0])
        config.head_dim = shape.head_dim  # no longer hidden_size / num_attention_heads
    try:
        if hasattr(config, "validate"):
            config.validate()
    except Exception as exc:  # noqa: BLE001 - transformers' own config checks, e.g. LlamaConfig's
        reason = str(getattr(exc, "__cause__", None) or exc).strip().splitlines()[-1]
        raise ConfigError(
            f"the pruned model ({heads[0]} heads, MLP width {inner[0]}) is not a valid "
            f"{type(config).__name__}: {reason}; choose prune.head_ratio / prune.heads_removed so that "
            f"the heads left divide hidden_size ({shape.hidden})"
        ) from None
    return config


def write_remote_code(target_dir: Path) -> None:
    from dsee_dist.models import pruned_gpt2

    shutil.copyfile(pruned_gpt2.__file__, Path(target_dir) / REMOTE_CODE_FILE)


def _sliced_tensors(plan: dict, shape: ModelShape, files: ModelFiles, dist_info) -> tuple[dict, set[str]]:
    """(the sliced weights and biases of the layers this rank owns (layer l: rank l % world_size), as stored; the
    keys of every tensor the pruning replaces, over all layers)."""
    conv1d = shape.family.conv1d
    my_tensors, replaced = {}, set()
    for layer in range(shape.n_layer):
        for relative, (rows, cols) in layer_index_maps(plan, shape, layer).items():
            module = module_name(shape, layer, relative)
            bias_key = files.key(module, "bias")
            replaced.add(files.key(module))
            if files.has(bias_key):
                replaced.add(bias_key)
            if layer % dist_info.world_size != dist_info.rank:
                continue
            w = _weight(files, module, conv1d)
            if rows is not None:
                w = w[rows]
            if cols is not None:
                w = w[:, cols]
            my_tensors[files.key(module)] = w.t().contiguous() if conv1d else w.contiguous()
            if files.has(bias_key):
                bias = files.get(bias_key)
                my_tensors[bias_key] = bias[rows] if rows is not None else bias
    return my_tensors, replaced


def _structured_report(prune_cfg, plan: dict) -> dict:
    return {
        "method": "structured",
        "score": prune_cfg.head_score,
        "plan": plan,
        "uniform_per_layer": uniform_per_layer(prune_cfg),
        "heads_removed": sum(len(h) for h in plan["heads_removed"]),
        "neurons_removed": sum(len(n) for n in plan["neurons_removed"]),
        "heads_per_layer": [len(h) for h in plan["heads_kept"]],
        "kv_heads_per_layer": [len(h) for h in plan["kv_heads_kept"]],
        "inner_per_layer": [len(n) for n in plan["neurons_kept"]],
    }


def prune_structured(
    prune_cfg, base_dir: str, adapter: tuple[dict, dict], target: Path, dist_info, log=logger.info, input_norms=None
) -> dict:
    """Collective. Writes the physically smaller model to `target`; returns the report (with the plan)."""
    from transformers import AutoConfig

    from dsee_dist.models.pruned_gpt2 import register

    register()
    files = ModelFiles(base_dir)
    model_config = AutoConfig.from_pretrained(base_dir)
    shape = check_structured_request(prune_cfg, model_config)  # refuse impossible requests before any work
    head_line = describe_head_request(prune_cfg, shape)
    if head_line:
        log(head_line)
    plan = plan_structured(prune_cfg, files, model_config, adapter, dist_info, input_norms)
    report = _structured_report(prune_cfg, plan)
    log(
        f"prune: removing {report['heads_removed']} of {sum(shape.heads)} attention heads and "
        f"{report['neurons_removed']:,} of {sum(shape.inner):,} MLP neurons (score '{prune_cfg.head_score}')"
    )
    my_tensors, replaced = _sliced_tensors(plan, shape, files, dist_info)
    config = pruned_config(model_config, plan)

    def rank_zero_files(tmp: Path) -> None:
        config.save_pretrained(tmp)
        if getattr(config, "auto_map", None):
            write_remote_code(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))

    write_pruned_model(target, files, my_tensors, replaced, rank_zero_files, dist_info)
    return report


def rows_to_spec(rows: torch.Tensor) -> tuple:
    """A sorted row index tensor as a slice tuple: (start, size) if contiguous, else (start, size, block,
    stride) where it has that regular shape."""
    start, size = int(rows[0]), rows.numel()
    if int(rows[-1]) - start + 1 == size:
        return (start, size)
    jumps = torch.nonzero(rows[1:] - rows[:-1] != 1).flatten()
    block = int(jumps[0]) + 1
    stride = int(rows[block] - rows[0])
    spec = (start, size, block, stride)
    if size % block or not torch.equal(slice_rows(spec), rows):
        raise ValueError(f"rows {rows.tolist()[:8]}... are not a regular block pattern")
    return spec


def slice_adapter(adapter: tuple[dict, dict], plan: dict, model_config) -> tuple[dict, dict]:
    """The stage-1 adapter restricted to the kept heads and neurons: B rows / A columns sliced, sparse
    entries in removed rows or columns dropped (the rest keep their order and values)."""
    config, tensors = adapter
    config = json.loads(json.dumps(config))
    tensors = dict(tensors)
    shape = model_shape(model_config)
    prefix = shape.family.layers + "."
    for name, meta in config["layers"].items():
        if not name.startswith(prefix):
            continue
        layer_str, _, relative = name[len(prefix) :].partition(".")
        rows, cols = layer_index_maps(plan, shape, int(layer_str)).get(relative, (None, None))
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
            kept_per_slice = []
            for rows_spec in slices:
                positions = row_slots([rows_spec], meta["out_features"])[rows]
                kept_per_slice.append((positions[positions >= 0], rows[positions >= 0]))
            if len({p.numel() for p, _ in kept_per_slice}) != 1:
                raise ValueError(f"{name}: the kept rows differ in number between its slices")
            b = torch.stack([b[i][positions] for i, (positions, _) in enumerate(kept_per_slice)])
            keep_entry &= row_map[index[0]] >= 0
            new_index[0] = row_map[index[0]]
            meta["slices"] = [list(rows_to_spec(row_map[kept_rows])) for _, kept_rows in kept_per_slice]
            meta["out_features"] = int(rows.numel())
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a.contiguous(), b.contiguous()
        tensors[f"{name}.sparse_index"] = new_index[:, keep_entry].contiguous()
        if f"{name}.sparse_values" in tensors:
            tensors[f"{name}.sparse_values"] = tensors[f"{name}.sparse_values"][keep_entry].contiguous()
    return config, tensors
