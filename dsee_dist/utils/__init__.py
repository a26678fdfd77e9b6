"""Small shared helpers: metrics log."""
