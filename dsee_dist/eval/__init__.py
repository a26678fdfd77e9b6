"""Generation and task metrics: decoding (decoding.py), the E2E figures (metrics.py), reading references
and outputs (references.py), and the training-time hook (during_training.py)."""
