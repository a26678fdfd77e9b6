"""The second sparsity of DSEE: pruning the final weights (METHOD.md §3).

- `targets`: which matrices of a decoder are prunable, by kind.
- `scores`: |ΔW|, |W0 + ΔW|, |W0| and random element scores; head and neuron scores.
- `selection`: the exact global k-smallest threshold over shards held by different ranks.
- `unstructured` / `structured`: writing the pruned base model (one module at a time, split across ranks).

Inference FLOPs per token (dense and structurally pruned) are counted from the model's shape in
`dsee_dist.models.flops`.
"""
