"""The second sparsity of DSEE: pruning the final weights (METHOD.md §3).

- `targets`: which matrices of a GPT-2-style model are prunable, by kind.
- `scores`: |ΔW|, |W0 + ΔW|, |W0| and random element scores; head and neuron scores.
- `selection`: the exact global k-smallest threshold over shards held by different ranks.
- `unstructured` / `structured`: writing the pruned base model (one module at a time, split across ranks).
- `flops`: inference FLOPs per token, per block and in total.
"""
