"""Datasets: E2E CSV / JSONL / plain text, tokenisation and caching, batching."""
