"""One checkpoint measurement (save + load through dsee_dist.checkpoint); launched by bench/checkpoint.py."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import end_rank  # noqa: E402
from _dsee_model import inject_random_dsee  # noqa: E402

from dsee_dist.engine import checkpoint, deepspeed_engine, process_group  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["full", "dsee"], required=True)
    p.add_argument("--ds-config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-sparse", type=int, default=16)
    p.add_argument("--local_rank", type=int, default=None)
    return p.parse_args()


def stepped_engine(args, ds: dict) -> tuple:
    """(engine, trainable parameters, bytes of DSEE's support indices) after one optimizer step (which creates
    the optimizer state) on a random GPT-2 of the requested shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab, n_positions=64)
    )
    index_bytes = 0
    if args.method == "full":
        params = list(model.parameters())
    else:
        params, support = inject_random_dsee(model, args.rank, args.num_sparse)
        index_bytes = sum(t.numel() * t.element_size() for t in support.values())
    engine, _, _ = deepspeed_engine.build_engine(model, torch.optim.AdamW(params, lr=1e-4), None, ds)
    x = torch.randint(0, args.vocab, (1, 16))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    return engine, params, index_bytes


def timed_save_and_load(engine, out: Path, info) -> tuple[Path, float, float]:
    """(checkpoint path, save seconds, load seconds), each timed between barriers."""
    process_group.barrier()
    t0 = time.perf_counter()
    path = checkpoint.save_checkpoint(
        engine, out, 1, config={"bench": True}, dist_info=info, keep_last=1, base_model="bench"
    )
    save_s = time.perf_counter() - t0
    process_group.barrier()
    t0 = time.perf_counter()
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
    process_group.barrier()
    return path, save_s, time.perf_counter() - t0


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args()
    info = process_group.init_distributed()
    ds = deepspeed_engine.build_deepspeed_config(
        json.loads(Path(args.ds_config).read_text()),
        {},
        micro_batch_size=1,
        grad_accum_steps=1,
        grad_clip=1.0,
        world_size=info.world_size,
    )
    engine, params, index_bytes = stepped_engine(args, ds)
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # ZeRO-3 partitions look empty
    lp_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
    # what must be saved to continue exactly: working weights + fp32 master + two Adam moments
    state_bytes = lp_bytes + n_trainable * 4 * 3
    path, save_s, load_s = timed_save_and_load(engine, Path(args.out), info)
    if info.is_rank_zero:
        ckpt_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        Path(args.out, "result.json").write_text(
            json.dumps(
                {
                    "trainable_params": n_trainable,
                    "trainable_state_bytes": state_bytes,
                    "index_bytes": index_bytes,
                    "checkpoint_bytes": ckpt_bytes,
                    "save_s": save_s,
                    "load_s": load_s,
                }
            )
        )


if __name__ == "__main__":
    main()
    end_rank(0)
