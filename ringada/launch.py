"""Pick the runtime for pipeline.mode and the world torchrun gave us."""

from __future__ import annotations

import os

from .config import Config, ConfigError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def train(cfg: Config) -> dict:
    mode = cfg.pipeline.mode
    if mode == "single":
        from .train import run_single

        return run_single(cfg)
    raise ConfigError(f"pipeline.mode: {mode!r} is not available in this version; use single")
