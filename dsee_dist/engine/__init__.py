"""DeepSpeed runtime: process group, engine build, checkpoints, resharding, preemption."""
