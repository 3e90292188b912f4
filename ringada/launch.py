"""Pick the runtime for pipeline.mode."""

from __future__ import annotations

from .config import Config, ConfigError


def train(cfg: Config) -> dict | None:
    mode = cfg.pipeline.mode
    if mode in ("single", "ring", "line"):
        from .runtime import train as run_pipeline

        return run_pipeline(cfg)
    raise ConfigError(f"pipeline.mode: {mode!r} is not available in this version; use single, ring or line")
