"""From a checkpoint to the adapter-only export, or to a merged Hugging Face model directory.

    dsee-dist export runs/x/checkpoints/step_00000400 --adapter out/adapter --merged out/merged
    dsee-dist export runs/x --merged out/merged        # the newest complete checkpoint of a run
    dsee-dist export runs/x --gguf out/model.gguf --gguf-type q8_0   # for llama.cpp / ollama
    dsee-dist export out/pruned --gguf out/pruned.gguf  # a merged or pruned export directory

Runs in one process on CPU, whatever the ZeRO stage and world size the checkpoint was written with:
the trainable tensors are reassembled from DeepSpeed's per-rank files, the frozen base comes from the
model directory recorded in the checkpoint, the support from the checkpoint itself. The merged model
holds W0 + (alpha/r)(B A + S) in every adapted matrix and loads with plain
`transformers.AutoModelForCausalLM.from_pretrained`. After pruning (a stage-2 checkpoint), the base is
the pruned one and the mask is applied to the merged weight, so the stated sparsity is the real one
(`dsee_export.json` reports it per matrix); a structurally pruned export carries its modeling file and
loads with `trust_remote_code=True` or `dsee_dist.models.pruned_gpt2.load_pruned_model`. `--gguf` writes the
merged model (or a merged / pruned export directory given as the source) as one GGUF file for llama.cpp
(Llama-family models only: dsee_dist.models.gguf_export). Outputs are written to a temporary name and renamed
when complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsee_dist.engine.checkpoint import find_resume_checkpoint, read_trainer_state
from dsee_dist.engine.process_exit import reports_errors
from dsee_dist.errors import DSEEError
from dsee_dist.models.gguf_export import GGUF_TYPES
from dsee_dist.recipes import methods

# The model-building modules (transformers, DeepSpeed: seconds to import) are imported where they are used,
# so that `dsee-dist export` refuses a wrong path or a missing --adapter/--merged at once.


def load_trainable_tensors(checkpoint_dir: Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """fp32 trainable tensors by parameter name, from any ZeRO stage and world size (`names`: which of a
    ZeRO-0 checkpoint's tensors are trainable; default DSEE's)."""
    from dsee_dist.engine.reshard import consolidate_trainable_state

    if any(checkpoint_dir.glob("*_optim_states.pt")):
        state, _ = consolidate_trainable_state(checkpoint_dir)
        return {name: s["fp32"] for name, s in state.items()}
    module = torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    if names is not None:
        return {k: v.float() for k, v in module.items() if k in names}
    return {k: v.float() for k, v in module.items() if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "sparse_values")}


def build_peft_model_from_checkpoint(checkpoint_dir: Path, cfg, base: str):
    """(the PeftModel of a method=lora/supra/shira run, trained tensors loaded, in eval mode). Its adapters are
    rebuilt as the trainer built them (recipes/methods.py: Supra's support from the same base weights, SHiRA's
    mask from the same seed); a support that differs from the checkpoint's is an error, not a silent load."""
    from transformers import AutoModelForCausalLM

    model, params = methods.prepare_trainable(cfg, AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    tensors = load_trainable_tensors(checkpoint_dir, names)
    missing = sorted(names - set(tensors))
    if missing:
        raise DSEEError(f"checkpoint '{checkpoint_dir}' has no tensor {missing[0]} (method={cfg.method})")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names:
                if tensors[name].shape != param.shape:
                    raise DSEEError(
                        f"checkpoint '{checkpoint_dir}': {name} has shape {tuple(tensors[name].shape)}, the "
                        f"{cfg.method} adapter rebuilt on '{base}' has {tuple(param.shape)}; pass the run's base model"
                    )
                param.copy_(tensors[name])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def build_model_from_checkpoint(checkpoint_dir: Path, base_model: str | None = None):
    """(the adapted model in eval mode, its config, the base model path)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dsee_dist.config import config_from_dict
    from dsee_dist.dsee.inject import dsee_layers, find_targets, inject_dsee
    from dsee_dist.dsee.placement import SUPPORT_FILE
    from dsee_dist.models.loading import end_zero3_init
    from dsee_dist.models.pruned_gpt2 import register
    from dsee_dist.pruning.stage2 import attach_keep_masks

    info = read_trainer_state(checkpoint_dir)
    cfg = config_from_dict(info.config, validate=False)
    base = base_model or info.base_model
    if not Path(base).exists() and base.startswith("/"):
        raise DSEEError(f"the base model '{base}' recorded in the checkpoint does not exist; pass --base-model")
    register()
    end_zero3_init()  # whole tensors, also in a process that trained under ZeRO-3
    if getattr(cfg, "method", "dsee") == "full":
        raise DSEEError(f"checkpoint '{checkpoint_dir}' is of method=full: its model is the run's merged/ directory")
    if getattr(cfg, "method", "dsee") != "dsee":
        return build_peft_model_from_checkpoint(checkpoint_dir, cfg, base), cfg, base
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    d = cfg.dsee
    specs = find_targets(model, d.target_modules, d.fused_slices, d.exclude_modules)
    support = load_file(str(checkpoint_dir / SUPPORT_FILE)) if (checkpoint_dir / SUPPORT_FILE).is_file() else {}
    inject_dsee(
        model, specs, support, rank=d.lora_rank, alpha=d.lora_alpha, dropout=d.lora_dropout, seed=cfg.train.seed
    )
    tensors = load_trainable_tensors(checkpoint_dir)
    with torch.no_grad():
        for name, layer in dsee_layers(model).items():
            for key, param in layer.adapter_params().items():
                if f"{name}.{key}" not in tensors:
                    raise DSEEError(f"checkpoint '{checkpoint_dir}' has no tensor {name}.{key}")
                param.copy_(tensors[f"{name}.{key}"])
    if Path(base).is_dir():  # a pruned base: the update is masked like the base
        attach_keep_masks(model, Path(base), None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), cfg, base


def merge_into_base(model) -> None:
    """Fold every DSEE layer into its base weight and put the plain module back."""
    from dsee_dist.dsee.inject import dsee_layers, set_submodule

    for name, layer in dsee_layers(model).items():
        layer.merge()
        set_submodule(model, name, layer.base)


def sparsity_report(model, pruning: dict | None) -> dict:
    """Zeros actually present in every prunable matrix of the merged model (per matrix and in total)."""
    from dsee_dist.dsee.layer import weight_out_in
    from dsee_dist.pruning.targets import KINDS, prunable_matrices

    matrices = {}
    for m in prunable_matrices(model.config, list(KINDS)):
        w = m.rows_of(weight_out_in(model.get_submodule(m.module)))
        matrices[m.name] = {"kind": m.kind, "zeros": int((w == 0).sum()), "numel": m.numel}
    zeros, numel = sum(v["zeros"] for v in matrices.values()), sum(v["numel"] for v in matrices.values())
    return {
        "pruning": {k: v for k, v in (pruning or {}).items() if k != "matrices"},
        "matrices": matrices,
        "total": {"zeros": zeros, "numel": numel, "sparsity": zeros / max(numel, 1)},
    }


def merge_model(model):
    """The plain merged model of one from `build_model_from_checkpoint` (pruning masks applied)."""
    if hasattr(model, "merge_and_unload"):  # a PEFT method's model (lora, supra, shira)
        model = model.merge_and_unload()
        model.config.use_cache = True
    else:
        merge_into_base(model)
    return model


def export_merged(model, cfg, base: str, target: Path, log=print):
    """Merge a model from `build_model_from_checkpoint` (pruning masks applied to the merged weights) and
    write it with `dsee_export.json`: the real sparsity of every prunable matrix and the FLOPs per token.
    Returns (the report, the merged model)."""
    from dsee_dist.models.flops import flops_per_token
    from dsee_dist.pruning.unstructured import read_report

    model = merge_model(model)
    report = sparsity_report(model, read_report(Path(base)) if Path(base).is_dir() else None)
    report["flops_per_token"] = flops_per_token(model.config, cfg.prune.flops_context)
    methods.save_hf_model(model, base, Path(target), report)
    total = report["total"]
    log(
        f"merged model written to {target}: {total['zeros']:,} of {total['numel']:,} prunable weights are zero "
        f"({100 * total['sparsity']:.2f}%), {report['flops_per_token']['total'] / 1e6:.2f} MFLOPs per token"
    )
    return report, model


def is_model_directory(path: str) -> bool:
    """A Hugging Face model directory (a merged or pruned export), not a checkpoint or a run."""
    return (Path(path) / "config.json").is_file()


def check_gguf_directory(model_dir: Path) -> None:
    """Refuse a model directory GGUF export cannot write, from its config.json alone (nothing loaded)."""
    from types import SimpleNamespace

    from dsee_dist.models.gguf_export import gguf_arch

    gguf_arch(SimpleNamespace(**json.loads((model_dir / "config.json").read_text())))


def export_gguf(model, tokenizer_dir: str, target: Path, gguf_type: str, log=print) -> dict:
    """Write a merged model and the tokenizer of `tokenizer_dir` as one GGUF file."""
    from transformers import AutoTokenizer

    from dsee_dist.models.gguf_export import write_gguf

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise DSEEError(f"GGUF export needs the model's tokenizer, and '{tokenizer_dir}' has none ({exc})") from None
    summary = write_gguf(model, tokenizer, Path(target), gguf_type, name=Path(tokenizer_dir).name)
    log(f"GGUF written to {target}: {summary['arch']}, {gguf_type}, {summary['bytes'] / 2**20:.1f} MiB")
    return summary


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory, a checkpoints/ root or a run's output.dir -> the checkpoint directory."""
    if not Path(path).exists():
        raise DSEEError(
            f"checkpoint '{path}' does not exist; give a checkpoint directory (checkpoints/step_N), "
            "a checkpoints/ root or a run's output.dir"
        )
    if (Path(path) / "stage2").is_dir() and not (Path(path) / "checkpoints").is_dir():  # a two-stage run's output.dir
        path = str(Path(path) / "stage2")
    found = find_resume_checkpoint(Path(path), path)
    assert found is not None
    return found


@reports_errors("dsee-dist export")
def main(argv: list[str] | None = None, prog: str = "dsee-dist export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument(
        "checkpoint",
        help="a checkpoint directory, a checkpoints/ root, or a run's output.dir; with --gguf alone also a merged "
        "or pruned export directory",
    )
    parser.add_argument("--adapter", help="write the adapter-only export here")
    parser.add_argument("--merged", help="write the merged Hugging Face model here")
    parser.add_argument("--gguf", help="write the merged model as one GGUF file here (Llama-family models)")
    parser.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES, help="GGUF weight type")
    parser.add_argument("--base-model", help="base model directory (default: the one recorded in the checkpoint)")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[dsee] {message}", flush=True)

    if not args.adapter and not args.merged and not args.gguf:
        raise DSEEError("nothing to do: give --adapter DIR and/or --merged DIR (or --gguf FILE)")
    if is_model_directory(args.checkpoint):  # a merged or pruned export: only --gguf applies
        if args.adapter or args.merged:
            raise DSEEError(f"'{args.checkpoint}' is a model directory, not a checkpoint: only --gguf applies to it")
        check_gguf_directory(Path(args.checkpoint))
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
        export_gguf(model, args.checkpoint, Path(args.gguf), args.gguf_type, log=log)
        return 0
    ckpt = resolve_checkpoint(args.checkpoint)
    model, cfg, base = build_model_from_checkpoint(ckpt, args.base_model)
    if args.gguf:  # refused before anything is written
        from dsee_dist.models.gguf_export import gguf_arch

        gguf_arch(model.config if not hasattr(model, "peft_config") else model.base_model.model.config)
    print(f"[dsee] export: {ckpt} (base {base})", flush=True)
    if args.adapter and hasattr(model, "peft_config"):  # lora, supra, shira: a PEFT adapter directory
        methods.save_peft_adapter(model, Path(args.adapter), base_model=base, is_rank_zero=True)
        print(f"[dsee] adapter written to {args.adapter}", flush=True)
    elif args.adapter:
        from dsee_dist.dsee.adapter import save_adapter

        save_adapter(model, Path(args.adapter), base_model=base, dsee_cfg=cfg.dsee, is_rank_zero=True)
        print(f"[dsee] adapter written to {args.adapter}", flush=True)
    if args.merged:
        _, model = export_merged(model, cfg, base, Path(args.merged), log=log)
    elif args.gguf:
        model = merge_model(model)
    if args.gguf:
        export_gguf(model, base, Path(args.gguf), args.gguf_type, log=log)
    return 0
