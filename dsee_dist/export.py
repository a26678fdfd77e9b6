"""From a checkpoint to the adapter-only export, or to a merged Hugging Face model directory.

    dsee-dist export runs/x/checkpoints/step_00000400 --adapter out/adapter --merged out/merged
    dsee-dist export runs/x --merged out/merged        # the newest complete checkpoint of a run

Runs in one process on CPU, whatever the ZeRO stage and world size the checkpoint was written with:
the trainable tensors are reassembled from DeepSpeed's per-rank files, the frozen base comes from the
model directory recorded in the checkpoint, the support from the checkpoint itself. The merged model
holds W0 + (alpha/r)(B A + S) in every adapted matrix and loads with plain
`transformers.AutoModelForCausalLM.from_pretrained`. Outputs are written to a temporary name and
renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapter import save_adapter
from .checkpoint import find_resume_checkpoint, read_trainer_state
from .config import config_from_dict
from .dsee.inject import dsee_layers, find_targets, inject_dsee, set_submodule
from .dsee.placement import SUPPORT_FILE
from .errors import DSEEError
from .reshard import consolidate_trainable_state


def load_trainable_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 trainable tensors by parameter name, from any ZeRO stage and world size."""
    if any(checkpoint_dir.glob("*_optim_states.pt")):
        state, _ = consolidate_trainable_state(checkpoint_dir)
        return {name: s["fp32"] for name, s in state.items()}
    module = torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items() if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "sparse_values")}


def build_model_from_checkpoint(checkpoint_dir: Path, base_model: str | None = None):
    """(the adapted model in eval mode, its config, the base model path)."""
    from transformers import AutoModelForCausalLM

    info = read_trainer_state(checkpoint_dir)
    cfg = config_from_dict(info.config, validate=False)
    base = base_model or info.base_model
    if not Path(base).exists() and base.startswith("/"):
        raise DSEEError(f"the base model '{base}' recorded in the checkpoint does not exist; pass --base-model")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    d = cfg.dsee
    specs = find_targets(model, d.target_modules, d.fused_slices, d.exclude_modules)
    support = load_file(str(checkpoint_dir / SUPPORT_FILE)) if (checkpoint_dir / SUPPORT_FILE).is_file() else {}
    inject_dsee(model, specs, support, rank=d.lora_rank, alpha=d.lora_alpha, dropout=d.lora_dropout, seed=cfg.train.seed)
    tensors = load_trainable_tensors(checkpoint_dir)
    with torch.no_grad():
        for name, layer in dsee_layers(model).items():
            for key, param in layer.adapter_params().items():
                if f"{name}.{key}" not in tensors:
                    raise DSEEError(f"checkpoint '{checkpoint_dir}' has no tensor {name}.{key}")
                param.copy_(tensors[f"{name}.{key}"])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), cfg, base


def merge_into_base(model) -> None:
    """Fold every DSEE layer into its base weight and put the plain module back."""
    for name, layer in dsee_layers(model).items():
        layer.merge()
        set_submodule(model, name, layer.base)


def save_merged(model, base_model: str, target: Path) -> None:
    from transformers import AutoTokenizer

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(base_model).save_pretrained(tmp)
    except (OSError, ValueError):  # a base without a tokenizer: the model alone
        pass
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def resolve_checkpoint(path: str) -> Path:
    found = find_resume_checkpoint(Path(path), path)
    assert found is not None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsee-dist export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory, a checkpoints/ root, or a run's output.dir")
    parser.add_argument("--adapter", help="write the adapter-only export here")
    parser.add_argument("--merged", help="write the merged Hugging Face model here")
    parser.add_argument("--base-model", help="base model directory (default: the one recorded in the checkpoint)")
    args = parser.parse_args(argv)
    try:
        if not args.adapter and not args.merged:
            raise DSEEError("nothing to do: give --adapter DIR and/or --merged DIR")
        ckpt = resolve_checkpoint(args.checkpoint)
        model, cfg, base = build_model_from_checkpoint(ckpt, args.base_model)
        print(f"[dsee] export: {ckpt} (base {base})", flush=True)
        if args.adapter:
            save_adapter(model, Path(args.adapter), base_model=base, dsee_cfg=cfg.dsee, is_rank_zero=True)
            print(f"[dsee] adapter written to {args.adapter}", flush=True)
        if args.merged:
            merge_into_base(model)
            save_merged(model, base, Path(args.merged))
            print(f"[dsee] merged model written to {args.merged}", flush=True)
    except DSEEError as exc:
        print(f"dsee-dist export: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
