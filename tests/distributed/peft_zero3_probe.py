"""Test-only rank program: what stock PEFT's Supertuning and SHiRA do on a ZeRO-3-partitioned model.

    python -m tests.distributed.peft_zero3_probe MODEL_DIR OUT_DIR

Each rank loads MODEL_DIR partitioned at creation (as the trainer does under ZeRO-3, every tensor partitioned:
persistence threshold 0), applies PEFT's own `get_peft_model` with no help from this project, and records what
happens in OUT_DIR/rank{R}.json: the placeholder the adapters see, the error of Supertuning's creation, and
the first forward through the DeepSpeed engine of SHiRA (whose random mask needs only the shape) and of
Supertuning created on the gathered weights (as recipes/methods.py does), against the whole base model.
Run by tests/distributed/test_peft_sparse_methods.py.
"""

import json
import sys
from pathlib import Path

import torch

from dsee_dist.engine import deepspeed_engine, process_group, zero
from dsee_dist.models.loading import load_model

TARGETS = ["q_proj", "v_proj"]


def _attempt(fn) -> dict:
    try:
        return {"ok": True, "result": fn()}
    except Exception as exc:  # the failure mode is what is recorded
        return {"ok": False, "error": type(exc).__name__, "message": str(exc).splitlines()[0][:400]}


def _max_abs_diff(engine, ids, reference) -> float:
    """Largest |logit difference| from the base model's (the adapters are zero at creation)."""
    with torch.no_grad():
        return float((engine(input_ids=ids).logits - reference).abs().max())


def main(model_dir: str, out_dir: str) -> int:
    from peft import ShiraConfig, SupertuningConfig, get_peft_model
    from peft.tuners.supertuning.layer import SupertuningLayer

    from dsee_dist.recipes import methods

    info = process_group.init_distributed()
    ds_config = deepspeed_engine.build_deepspeed_config(
        deepspeed_engine.resolve_deepspeed_json(Path("configs/ds/zero3_fp32.json")),
        {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        micro_batch_size=1,
        grad_accum_steps=1,
        grad_clip=0.0,
        world_size=info.world_size,
    )
    ids = torch.arange(1, 9).reshape(1, 8)
    with torch.no_grad():
        reference = load_model(model_dir)(input_ids=ids).logits  # the whole base model: what a zero update gives
    record = {}
    model = load_model(model_dir, ds_config)
    weight = model.model.layers[0].self_attn.q_proj.weight
    record["placeholder"] = {
        "partitioned": zero.is_partitioned(weight),
        "data_numel": weight.data.numel(),
        "full_shape": list(getattr(weight, "ds_shape", weight.shape)),
    }
    supra = SupertuningConfig(target_modules=TARGETS, sparsity=0.99, r=4, lora_alpha=8)
    record["supertuning_create"] = _attempt(lambda: type(get_peft_model(model, supra)).__name__)

    model = load_model(model_dir, ds_config)
    shira = get_peft_model(model, ShiraConfig(r=4, target_modules=TARGETS, random_seed=0))
    optimizer = deepspeed_engine.build_optimizer(
        [{"params": [p for p in shira.parameters() if p.requires_grad]}], ds_config, 1e-3, (0.9, 0.999), 0.0
    )
    engine, _, _ = deepspeed_engine.build_engine(shira, optimizer, None, ds_config)
    record["shira_forward"] = _attempt(lambda: _max_abs_diff(engine, ids, reference))

    # Supertuning created on the gathered weights (this project's step; recipes/methods.py), then its forward
    model = load_model(model_dir, ds_config)
    with methods._gathered_during_update_layer(SupertuningLayer):
        supra_model = get_peft_model(model, supra)
    optimizer = deepspeed_engine.build_optimizer(
        [{"params": [p for p in supra_model.parameters() if p.requires_grad]}], ds_config, 1e-3, (0.9, 0.999), 0.0
    )
    engine, _, _ = deepspeed_engine.build_engine(supra_model, optimizer, None, ds_config)
    record["supertuning_gathered_forward"] = _attempt(lambda: _max_abs_diff(engine, ids, reference))
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(record, indent=1) + "\n")
    process_group.barrier()
    process_group.shutdown()
    return 0


if __name__ == "__main__":
    from dsee_dist.engine.process_exit import exit_process

    exit_process(main(*sys.argv[1:]))  # as the trainer's ranks end: no interpreter teardown after gloo
