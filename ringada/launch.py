"""``ringada train``: check everything, join the process group, build the mode's trainer, drive it.

The order matters (DESIGN: failure semantics). Every user mistake is rejected before the process group starts;
the lead rank (which holds the checkpoints) decides where the run continues before it too, and tells the other
ranks in the first exchange, so a resume that does not fit stops every rank with the same error instead of a
hang. The process group and every wait after it have a deadline of ``run.timeout_s``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from . import checkpoint
from .comm import start_world
from .config import Config, ConfigError
from .driver import drive


def world_from_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def train(cfg: Config) -> dict | None:
    """Train with the world torchrun gave us (or one process). Returns the summary on the lead rank."""
    rank, world_size = world_from_env()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    mode = cfg.pipeline.mode
    if mode in ("single", "ring", "line"):
        from .runtime import PipelineJob as Job
    elif mode in ("sfl", "sft"):
        from .star import StarJob as Job
    else:
        raise ConfigError(f"pipeline.mode: {mode!r} is unknown; use single, ring, line, sfl or sft")
    job = Job(cfg, rank, world_size)
    found, refusal = None, None
    if job.is_lead:
        try:
            if cfg.run.resume is False:
                checkpoint.clear(cfg.run.out_dir)
            found = checkpoint.resume_point(cfg)
        except ConfigError as e:
            refusal = e  # raised on every rank once the others have been told
    torch.manual_seed(cfg.run.seed)
    if world_size > 1:
        start_world(rank, world_size, cfg.run.timeout_s)
    try:
        return drive(cfg, job.build(refusal), found)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
