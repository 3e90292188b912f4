"""Atomic, resumable checkpoints of a pipeline run (single, ring, line).

``run.checkpoint_every: N`` writes ``run.out_dir/checkpoints/step_<S>/`` after every N optimizer steps: one
safetensors file per rank (its adapters and their AdamW state) and then, once every rank has written its file,
``manifest.json`` from rank 0. A checkpoint counts only when its manifest exists, and every file is written
under a temporary name and renamed, so a crash never leaves a half-written checkpoint that a resume would read.

Nothing else is needed to continue exactly: the batch of a step and the adapter dropout masks are pure functions
of (seed, step), and the manifest carries the unfreezing state and the counters of the run so far.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapters import Adapters
from .config import Config, ConfigError

MANIFEST = "manifest.json"


# what may differ between the run that wrote a checkpoint and the one resuming it
_RESUMABLE_CHANGES = {"run.steps", "run.resume", "run.checkpoint_every", "run.eval_every", "run.log_every",
                      "run.message_log", "run.threads", "run.out_dir"}


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write under a temporary name, flush it to disk, rename it into place and flush the directory."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def config_fingerprint(cfg: Config) -> dict:
    """The settings a resume must share with the run that wrote the checkpoint (flattened ``section.key``)."""
    flat = {f"{section}.{key}": value for section, keys in cfg.to_dict().items() for key, value in keys.items()}
    return json.loads(json.dumps({k: v for k, v in flat.items() if k not in _RESUMABLE_CHANGES}))  # as stored


def clear(out_dir: str | Path) -> None:
    """A fresh run (no run.resume) removes an earlier run's checkpoints from its out_dir, so that a later resume
    can only ever continue this run."""
    root = Path(out_dir) / "checkpoints"
    if root.is_dir():
        shutil.rmtree(root)


def rank_tensors(adapters: Adapters, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """This rank's adapters and the AdamW state of those that have one, keyed by adapter name."""
    tensors = {f"adapter/{p.key}": p.param.detach().contiguous() for p in adapters.params}
    if optimizer is not None:
        for p in adapters.params:
            for name, value in optimizer.state.get(p.param, {}).items():
                tensors[f"optim/{p.key}/{name}"] = torch.as_tensor(value).detach().contiguous()
    return tensors


def write_rank(out_dir: str | Path, step: int, rank: int, tensors: dict[str, torch.Tensor]) -> None:
    directory = step_dir(out_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / f"rank{rank}.safetensors", lambda tmp: save_file(tensors, str(tmp)))


def write_manifest(out_dir: str | Path, step: int, manifest: dict) -> None:
    """Called once every rank's file is on disk: from here on the checkpoint counts."""
    _atomic_write(step_dir(out_dir, step) / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))


def latest(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint (its directory and manifest), or None."""
    root = Path(out_dir) / "checkpoints"
    steps = sorted((d for d in root.glob("step_*") if d.name[5:].isdigit()), key=lambda d: int(d.name[5:]),
                   reverse=True) if root.is_dir() else []
    for directory in steps:
        if (directory / MANIFEST).is_file():
            return directory, json.loads((directory / MANIFEST).read_text())
    return None


def find_resume_point(cfg: Config, world_size: int, partition: list[int]) -> tuple[Path, dict]:
    """The checkpoint ``run.resume`` continues from, checked against this launch before any collective: the
    same world size, partition and settings, a step within run.steps, and every rank's file readable."""
    out_dir = cfg.run.out_dir
    found = latest(out_dir)
    if found is None:
        raise ConfigError(f"run.resume: got true but {Path(out_dir) / 'checkpoints'} holds no complete checkpoint; "
                          "run with run.checkpoint_every > 0 first, or set run.resume=false")
    directory, manifest = found
    if manifest["world_size"] != world_size or manifest["partition"] != list(partition):
        raise ConfigError(f"run.resume: {directory} was written by {manifest['world_size']} ranks with partition "
                          f"{manifest['partition']}; this launch has {world_size} ranks with {list(partition)}. "
                          "Resume with the same world size and pipeline.partition")
    mine = config_fingerprint(cfg)
    theirs = manifest.get("config", {})
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if changed:
        k = changed[0]
        raise ConfigError(f"run.resume: {directory} was written with {k}={theirs.get(k)!r}; this launch has "
                          f"{k}={mine.get(k)!r} ({len(changed)} setting(s) differ: {', '.join(changed[:5])}). Only "
                          f"{', '.join(sorted(_RESUMABLE_CHANGES))} may change when resuming")
    if manifest["step"] > cfg.run.steps:
        raise ConfigError(f"run.resume: {directory} is after step {manifest['step']}, beyond run.steps="
                          f"{cfg.run.steps}; set run.steps >= {manifest['step']}")
    for r in range(world_size):
        try:
            with safe_open(directory / f"rank{r}.safetensors", framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            raise ConfigError(f"run.resume: {directory / f'rank{r}.safetensors'} cannot be read ({e}); remove "
                              f"{directory} to resume from the checkpoint before it") from None
    return directory, manifest


def load_rank(directory: Path, rank: int, adapters: Adapters, optimizer: torch.optim.Optimizer | None) -> None:
    """Restore this rank's adapters and AdamW state from a checkpoint."""
    tensors = load_file(directory / f"rank{rank}.safetensors")
    adapters.load_state_dict({k.removeprefix("adapter/"): v for k, v in tensors.items() if k.startswith("adapter/")})
    if optimizer is None:
        return
    by_key = {p.key: p.param for p in adapters.params}
    optimizer.state.clear()
    for name, value in tensors.items():
        if name.startswith("optim/"):
            key, field = name[len("optim/"):].rsplit("/", 1)
            optimizer.state[by_key[key]][field] = value.clone()
