"""Small shared helpers: atomic files, logging set-up, the metrics log, signal handlers."""
