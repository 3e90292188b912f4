"""Atomic, resumable checkpoints for every mode, written by the lead rank alone (Note: checkpoint layout).

``run.out_dir/checkpoints/step_<S>/`` holds the state after optimizer step S:

- ``state.safetensors``: every tensor that must survive a restart, keyed by name, never by rank. Adapters go
  under their peft key (which names the block), their AdamW state under ``optim/<key>/<field>``, and a star's
  per-device state under ``device<u>/...``. A ring checkpoint can therefore continue on another world size or
  partition: each rank takes the keys of the blocks it holds now.
- ``manifest.json``: written last, so a checkpoint counts only once it exists. It holds the step, the settings
  the run must keep (:func:`config_fingerprint`) and the run's JSON state (unfreezing, selection statistics,
  RNG, counters, rounds so far).

The lead rank (the ring's initiator, the star's server) gathers the tensors over the wire and writes them, so no
other box needs the directory. Every file is written under a temporary name, flushed and renamed, so a crash
never leaves a half-written checkpoint that a resume would read. Only the newest ``KEEP`` complete checkpoints
stay on disk.

Nothing else is needed to continue exactly: the batch of a step and the adapter dropout masks are pure functions
of (seed, step), and the manifest carries the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapters import Adapters
from .config import Config, ConfigError
from .train import json_safe

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "state.safetensors"
KEEP = 2  # complete checkpoints kept on disk (the newest one, and one to fall back on)

# What may differ between the run that wrote a checkpoint and the one continuing it. Partition, world size,
# schedule and micro-batches only change how the same sums are split (the continuation equals a single process
# resumed from the same checkpoint); optim.lr and grad_clip are the usual rescue after a divergence; compress.eval
# only chooses which evaluation is the headline; star.emulate, star.recompute and star.server_micro_batches change
# time and memory only.
_RESUMABLE_CHANGES = {"run.steps", "run.resume", "run.checkpoint_every", "run.eval_every", "run.eval_batches",
                      "run.log_every", "run.message_log", "run.threads", "run.out_dir", "run.timeout_s",
                      "optim.lr", "optim.grad_clip", "optim.on_nonfinite", "pipeline.mode", "pipeline.schedule",
                      "pipeline.partition", "pipeline.profile", "pipeline.emulate", "pipeline.lookahead",
                      "data.micro_batches",
                      "star.rounds", "star.emulate", "star.recompute", "star.server_micro_batches",
                      "compress.eval"}


def family(mode: str) -> str:
    """Modes whose checkpoints continue one another: the pipeline modes share one state, star modes another."""
    return "star" if mode in ("sfl", "sft") else "pipeline"


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
    """``run.resume: false`` starts over: an earlier run's checkpoints in out_dir are removed."""
    # every rank of a run sharing out_dir may clear it at once (before any of them writes one)
    shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)


def save(out_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Write one complete checkpoint (tensors first, the manifest last) and prune the older ones."""
    directory = step_dir(out_dir, step)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # the non-finite guard stops any update first; reaching this is a bug
        raise ValueError(f"refusing to checkpoint non-finite tensors: {bad[:3]}")
    _atomic_write(directory / STATE, lambda tmp: save_file(tensors, str(tmp)))
    manifest = {**manifest, "step": step}
    _atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(json_safe(manifest), indent=2)))
    for old in _complete(out_dir)[KEEP:]:
        shutil.rmtree(old[0], ignore_errors=True)
    for partial in _partial(out_dir, older_than=step):
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def _steps(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((d for d in root.glob("step_*") if d.name[5:].isdigit()), key=lambda d: int(d.name[5:]),
                  reverse=True)


def _complete(out_dir: str | Path) -> list[tuple[Path, dict]]:
    found = []
    for directory in _steps(out_dir):
        try:
            found.append((directory, json.loads((directory / MANIFEST).read_text())))
        except (OSError, json.JSONDecodeError):
            continue  # no manifest (or a torn one from another writer): not a checkpoint
    return found


def _partial(out_dir: str | Path, older_than: int) -> list[Path]:
    """Directories of checkpoints before ``older_than`` that never completed (a crash between the tensors and
    the manifest)."""
    return [d for d in _steps(out_dir) if int(d.name[5:]) < older_than and not (d / MANIFEST).is_file()]


def latest(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint (its directory and manifest), or None."""
    found = _complete(out_dir)
    return found[0] if found else None


def resume_point(cfg: Config, world_size: int | None = None) -> tuple[Path, dict] | None:
    """Where this launch continues from, by ``run.resume``: ``auto`` the newest complete checkpoint of this run
    or a fresh start when there is none, ``true`` the newest checkpoint or an error, ``false`` a fresh start
    (the caller clears the old checkpoints). Checked on the lead rank before any collective."""
    if cfg.run.resume is False:
        return None
    found = latest(cfg.run.out_dir)
    if found is None:
        if cfg.run.resume is True:
            raise ConfigError(f"run.resume: got true but {Path(cfg.run.out_dir) / 'checkpoints'} holds no complete "
                              "checkpoint; use run.resume=auto to start fresh when there is none")
        return None
    check_resumable(cfg, *found, world_size=world_size)
    return found


def check_resumable(cfg: Config, directory: Path, manifest: dict, world_size: int | None = None) -> None:
    """Refuse a checkpoint this launch cannot continue exactly, naming the setting and the fix."""
    fix = "or set run.resume=false to start over (it deletes the checkpoints)"
    if manifest.get("family") != family(cfg.pipeline.mode):
        raise ConfigError(f"run.resume: {directory} was written by a {manifest.get('family')} run; pipeline.mode="
                          f"{cfg.pipeline.mode!r} cannot continue it. Use another run.out_dir, {fix}")
    if manifest["family"] == "star":
        # a star's state is per device set and per shard: the same mode and the same devices continue it
        if manifest.get("mode") != cfg.pipeline.mode:
            raise ConfigError(f"run.resume: {directory} was written by pipeline.mode={manifest.get('mode')!r}; this "
                              f"launch has {cfg.pipeline.mode!r}. Use the run's own mode, {fix}")
        if world_size is not None and manifest.get("world_size") != world_size:
            raise ConfigError(f"run.resume: {directory} was written by a star of {manifest.get('world_size')} ranks; "
                              f"this launch has WORLD_SIZE={world_size}. A star continues with the same devices "
                              f"(its shards and per-device state depend on them), {fix}")
    mine, theirs = config_fingerprint(cfg), manifest.get("config", {})
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if changed:
        k = changed[0]
        raise ConfigError(f"run.resume: {directory} was written with {k}={theirs.get(k)!r}; this launch has "
                          f"{k}={mine.get(k)!r} ({len(changed)} setting(s) differ: {', '.join(changed[:5])}). "
                          f"Launch with the run's own settings (its config.yaml), {fix}")
    if manifest["step"] > cfg.run.steps:
        raise ConfigError(f"run.resume: {directory} is after step {manifest['step']}, beyond run.steps="
                          f"{cfg.run.steps}; set run.steps >= {manifest['step']}, {fix}")
    try:
        with safe_open(directory / STATE, framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        raise ConfigError(f"run.resume: {directory / STATE} cannot be read ({e}); remove {directory} to resume "
                          f"from the checkpoint before it, {fix}") from None


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / STATE)


# ------------------------------------------------------------------------------------ adapters and their AdamW


def adapter_tensors(adapters: Adapters, optimizer: torch.optim.Optimizer | None,
                    prefix: str = "") -> dict[str, torch.Tensor]:
    """Adapters and the AdamW state of those that have one, keyed by adapter key (so by block)."""
    return {**{f"{prefix}{p.key}": p.param.detach() for p in adapters.params},
            **optimizer_tensors(adapters, optimizer, prefix)}


def optimizer_tensors(adapters: Adapters, optimizer: torch.optim.Optimizer | None,
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """The AdamW state of the adapters that have one, as ``<prefix>optim/<key>/<field>``."""
    tensors = {}
    if optimizer is not None:
        for p in adapters.params:
            for name, value in optimizer.state.get(p.param, {}).items():
                tensors[f"{prefix}optim/{p.key}/{name}"] = torch.as_tensor(value).detach()
    return tensors


def select(tensors: dict[str, torch.Tensor], keys, prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapters named by ``keys`` and their AdamW state: what a process holding those adapters restores."""
    keys = set(keys)
    head = f"{prefix}optim/"
    return {name: t for name, t in tensors.items()
            if name[len(prefix):] in keys and name.startswith(prefix)
            or name.startswith(head) and name[len(head):].rsplit("/", 1)[0] in keys}


def load_adapter_tensors(tensors: dict[str, torch.Tensor], adapters: Adapters,
                         optimizer: torch.optim.Optimizer | None, prefix: str = "") -> None:
    """Restore adapters and AdamW state written by :func:`adapter_tensors` (the keys this process holds)."""
    adapters.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                              if k.startswith(prefix) and not k.startswith(f"{prefix}optim/")})
    load_optimizer_tensors(tensors, adapters, optimizer, prefix)


def load_optimizer_tensors(tensors: dict[str, torch.Tensor], adapters: Adapters,
                           optimizer: torch.optim.Optimizer | None, prefix: str = "") -> None:
    """Replace the AdamW state of ``adapters`` with the one in ``tensors`` (an adapter without any starts fresh,
    as one that never had a gradient)."""
    if optimizer is None:
        return
    by_key = {p.key: p.param for p in adapters.params}
    for p in adapters.params:
        optimizer.state.pop(p.param, None)
    head = f"{prefix}optim/"
    for name, value in tensors.items():
        if name.startswith(head):
            key, field = name[len(head):].rsplit("/", 1)
            if key in by_key:
                device = by_key[key].device
                # AdamW keeps its step count on the CPU unless capturable; moments live with the parameter
                optimizer.state[by_key[key]][field] = (value.to("cpu") if field == "step" else value.to(device)).clone()
