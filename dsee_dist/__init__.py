"""dsee-dist: DSEE (Dually Sparsity-embedded Efficient Tuning) for GPT-2-style decoders on DeepSpeed."""

__version__ = "0.1.0"
