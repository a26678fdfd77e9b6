"""Generation and task metrics: decoding (decoding.py), the E2E figures (metrics.py), reading references
and outputs (references.py), the training-time hook (during_training.py), text perplexity by the
pruning literature's protocol (perplexity.py), and the training loop's tokens/s and MFU (throughput.py)."""
