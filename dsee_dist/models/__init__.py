"""Model loading (local directory, built-in random configs), tokenizers, pruned GPT-2."""
