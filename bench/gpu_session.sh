#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one command, for a lent single-GPU machine (H100/H200)
# with no network: most important first, each benchmark under its own time limit, every result written to
# $OUT (or ./gpu-results) as soon as it is finished, so a run stopped at its limit still returns what it did.
#
#   bash bench/gpu_session.sh [BUDGET_SECONDS]      # default 540: fits one 10-minute command
#
# Packages the machine may lack (DeepSpeed, hjson, pydantic; transformers of this project's version) are
# installed from ./.whl if that folder exists (wheels for the machine's Python, downloaded beforehand with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`; DeepSpeed has no wheel on PyPI:
# `pip wheel --no-deps deepspeed==0.19.8` makes one). Order and budgets (seconds):
#   1. bench/dsee_layer.py                            one projection: DSEE's sparse paths (autograd, fused,    90
#                                                     folded, dense, torch.compile) vs PEFT LoRA, Supra, SHiRA
#   2. bench/step_time.py --family llama --methods    TinyLlama-1.1B shape, ZeRO-2: step time and                150
#      lora,dsee,supra,shira                          max_memory_allocated of dsee/supra/shira over lora
#   3. bench/step_time.py --family llama              TinyLlama-1.1B shape, ZeRO-2 and ZeRO-3               200
#   4. bench/train_loop.py --device gpu               the trainer vs a plain PEFT loop, p90 / median        120
#   5. bench/step_time.py --family gpt2 --stages 2    GPT-2-medium shape, ZeRO-2                            90
#   6. bench/train_loop.py --methods                  the trainer with each adapter, over the lora trainer  150
#      lora,dsee,supra,shira
#   7. bench/sparse24.py                              2:4 semi-structured vs dense F.linear, SmolLM2 shapes,  45
#                                                     fp16 (issue 41; decode too with --model of a 2:4 export)
#   8. bench/memory_plan.py                           plan vs torch.cuda.max_memory_allocated               the rest
set -u
BUDGET=${1:-540}
RESULTS=${OUT:-$PWD/gpu-results}
mkdir -p "$RESULTS"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_session: installing ./.whl failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  date -u +%FT%TZ
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" 2>&1
} > "$RESULTS/device.txt"
cat "$RESULTS/device.txt"

run() {  # run NAME SECONDS CMD...: one benchmark, its output in $RESULTS/NAME.log, skipped when time is short
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "gpu_session: $name skipped: ${left}s of the budget left" | tee "$RESULTS/$name.log"
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$RESULTS/$name.log"
  echo "=== $name: exit $rc after $(($(date +%s) - START))s in all"
}

run dsee_layer 90 python3 bench/dsee_layer.py --device gpu --out "$RESULTS/dsee_layer.json"
run step_time_sparse 150 python3 bench/step_time.py --family llama --device gpu --stages 2 \
  --methods lora,dsee,supra,shira --repeats 2 --steps 10 --out "$RESULTS/step_time_sparse.json"
run step_time_llama 200 python3 bench/step_time.py --family llama --device gpu --stages 2,3 --repeats 1 --steps 10
run train_loop 120 python3 bench/train_loop.py --device gpu --repeats 1 --steps 20 --warmup 5
run step_time_gpt2 90 python3 bench/step_time.py --family gpt2 --device gpu --stages 2 --repeats 1 --steps 10
run train_loop_sparse 150 python3 bench/train_loop.py --device gpu --methods lora,dsee,supra,shira --repeats 1 \
  --steps 20 --warmup 5 --out "$RESULTS/train_loop_sparse.json"
run sparse24 45 python3 bench/sparse24.py --repeats 20 --out "$RESULTS"
run memory_plan 600 python3 bench/memory_plan.py
echo "gpu_session: done in $(($(date +%s) - START))s; results in $RESULTS"
