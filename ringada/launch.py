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
from .comm import Placement, start_world
from .config import Config, ConfigError
from .driver import drive


def world_from_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def placement(cfg: Config) -> tuple[torch.device, str]:
    """(device, backend) of this rank from run.device / run.backend and this box (torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE); checked before the process group starts."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.run.device == "cuda" and gpus == 0:
        raise ConfigError("run.device: got 'cuda' but torch sees no GPU on this box (torch.cuda.is_available() is "
                          "False); use auto or cpu")
    device = torch.device(f"cuda:{local_rank % gpus}") if cfg.run.device != "cpu" and gpus else torch.device("cpu")
    if cfg.run.backend == "nccl":
        if device.type != "cuda":
            raise ConfigError("run.backend: got 'nccl' but this rank computes on the CPU; use gloo")
        if local_world > gpus:
            raise ConfigError(f"run.backend: got 'nccl' with {local_world} ranks on this box and {gpus} GPU(s); NCCL "
                              "needs a GPU per rank (it refuses two ranks on one GPU): use gloo, which shares a GPU "
                              "through pinned host buffers")
        return device, "nccl"
    return device, "gloo"


def train(cfg: Config) -> dict | None:
    """Train with the world torchrun gave us (or one process). Returns the summary on the lead rank."""
    rank, world_size = world_from_env()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    mode = cfg.pipeline.mode
    if mode in ("single", "ring", "line"):  # (a star imports the pipeline runtime too: rows, topology helpers)
        from .runtime import PipelineJob as Job
    elif mode in ("sfl", "sft"):
        from .star import StarJob as Job
    else:
        raise ConfigError(f"pipeline.mode: {mode!r} is unknown; use single, ring, line, sfl or sft")
    if cfg.run.resume is False:
        checkpoint.clear(cfg.run.out_dir)  # every box: a later resume must never find this run's predecessor
    job = Job(cfg, rank, world_size)
    found, refusal = None, None
    if job.is_lead:
        try:
            found = checkpoint.resume_point(cfg, world_size)
        except ConfigError as e:
            refusal = e  # raised on every rank once the others have been told
    device, backend = placement(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.run.seed)
    data_groups = start_world(rank, world_size, cfg.run.timeout_s, backend) if world_size > 1 else None
    try:
        trainer = job.build(refusal, found[1]["step"] if found else -1, Placement(device, data_groups))
        return drive(cfg, trainer, found)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
