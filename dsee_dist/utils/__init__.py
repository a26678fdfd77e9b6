"""Small shared helpers: atomic files, logging set-up, the metrics log, throughput, signal handlers."""
