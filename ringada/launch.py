"""Pick the runtime for pipeline.mode."""

from __future__ import annotations

from .config import Config, ConfigError


def train(cfg: Config) -> dict | None:
    mode = cfg.pipeline.mode
    if mode in ("single", "ring", "line"):
        from .runtime import train as run_pipeline

        return run_pipeline(cfg)
    if mode in ("sfl", "sft"):
        from .runtime import world_from_env
        from .star import train_star

        return train_star(cfg, *world_from_env())
    raise ConfigError(f"pipeline.mode: {mode!r} is unknown; use single, ring, line, sfl or sft")
