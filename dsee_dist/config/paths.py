"""Where a relative path in a config points (read by validation and by the runs alike)."""

from __future__ import annotations

from pathlib import Path

from dsee_dist.config.schema import Config

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(cfg: Config, value: str) -> Path:
    """A relative path from the config: working directory first, then the YAML's directory, then the repo."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for base in (cfg.source_dir, str(REPO_ROOT)):
        if base and (Path(base) / p).exists():
            return Path(base) / p
    return p
