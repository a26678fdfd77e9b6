"""One (method, DeepSpeed config) step-time measurement; launched by bench/step_time.py under deepspeed."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsee_dist import distributed  # noqa: E402
from dsee_dist.dsee.inject import find_targets, inject_dsee, mark_only_adapters_trainable  # noqa: E402
from dsee_dist.dsee.support import matrix_generator, select_support  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["full", "lora", "dsee"], required=True)
    p.add_argument("--ds-config", required=True)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-sparse", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--result", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()

    info = distributed.init_distributed()
    if not torch.cuda.is_available():  # one rank per core share: oversubscription makes CPU timings noise
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    ds = distributed.build_deepspeed_config(json.loads(Path(args.ds_config).read_text()), {},
                                            micro_batch_size=args.micro_batch, grad_accum_steps=1, grad_clip=1.0,
                                            world_size=info.world_size)
    from transformers import GPT2Config, GPT2LMHeadModel

    from dsee_dist import models

    if ds["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        models._HF_DS_CONFIG = HfDeepSpeedConfig(ds)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab,
                        n_positions=args.seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    if args.method == "full":
        params = [p for p in model.parameters()]
    elif args.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["c_attn"],
                                                 fan_in_fan_out=True, lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        specs = find_targets(model, ["c_attn"], ["q", "v"])
        support = {m: select_support(torch.zeros(args.n_embd, args.n_embd), args.num_sparse, "random",
                                     generator=matrix_generator(0, m)) for s in specs for m in s.matrix_names()}
        inject_dsee(model, specs, support, rank=args.rank, alpha=2 * args.rank, dropout=0.0, seed=0)
        params = mark_only_adapters_trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    engine, _, _ = distributed.build_engine(model, optimizer, None, ds)
    engine.train()
    dev = distributed.device()
    g = torch.Generator().manual_seed(info.rank)
    times = []
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=g).to(dev)
        distributed.barrier()
        t0 = time.perf_counter()
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    if info.is_rank_zero:
        Path(args.result).write_text(json.dumps({"median_step_s": statistics.median(times), "trainable": trainable,
                                                 "steps": len(times)}))
    distributed.shutdown()


if __name__ == "__main__":
    main()
