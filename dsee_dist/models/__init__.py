"""Models: the decoder families as data (`families`), the one description of a model's shape built from them
(`shape`) and its FLOPs per token (`flops`); loading (local directory, built-in random configs), tokenizers, the
pruned GPT-2, fetching SmolLM2 and the GGUF export."""
