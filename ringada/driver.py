"""One driver for every mode: resume, train unit by unit, evaluate, checkpoint, record, summarize.

A topology runtime (``runtime.PipelineTrainer`` for single/ring/line; ``star.ServerTrainer`` and
``star.DeviceTrainer`` for sfl/sft) is a
:class:`Trainer`: it knows its ranks and its wire, and offers a few verbs. A *unit* is what a checkpoint and an
evaluation may follow: one optimizer step in a pipeline, one round (``star.local_steps`` steps) in a star.
The driver runs the same loop on every rank; only the lead rank (the ring's initiator, the star's server)
writes files.

Failures (DESIGN: failure semantics): a unit whose loss or gradient norm is not finite changes nothing
(the trainer guarantees it on every rank). With ``optim.on_nonfinite: skip`` the driver counts it and goes on;
with ``stop`` it writes a checkpoint of the state before that unit, the last finite adapters and the summary,
then raises :class:`NonFiniteError`. A restart continues from the newest checkpoint (``run.resume: auto``).
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .adapters import save_adapters
from .config import Config
from .train import RunRecorder, progress

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """optim.on_nonfinite=stop: a NaN or Inf loss or gradient norm ended the run before any update."""


@dataclass
class UnitResult:
    """What one unit produced: its metrics records (lead rank), its tokens, and a non-finite report."""

    records: list[dict] = field(default_factory=list)
    tokens: int = 0
    loss: float | None = None  # the unit's last finite training loss
    nonfinite: str | None = None  # "non-finite loss (nan) at step 4 micro-batch 1 on rank 0", or None
    # the eval record of the adapters the unit ended with, where the unit evaluated them itself (a plateau check),
    # on every rank alike: the driver's evaluation at the same point reuses it
    evaluated: dict | None = None


class Trainer(ABC):
    """The verbs a topology runtime gives the driver. Methods marked *collective* run on every rank together;
    their return values matter on the lead rank only."""

    is_lead: bool
    mode: str
    world_size: int
    steps_per_unit: int  # optimizer steps per unit
    checkpoint_every: int  # steps between checkpoints (0: none)
    has_eval: bool  # the same on every rank

    @abstractmethod
    def start(self, resume: tuple[int, dict[str, torch.Tensor], dict] | None) -> int | None:
        """Collective: bring every rank to the state of ``resume`` (on the lead: the checkpoint's step, tensors
        and JSON state), or to the fresh initial state. Returns the step resumed after, on every rank."""

    @abstractmethod
    def evaluate(self) -> dict:
        """Collective: the eval record (eval_loss, eval_ppl or eval_accuracy)."""

    @abstractmethod
    def train_unit(self, unit: int) -> UnitResult:
        """Collective: train one unit. A non-finite unit leaves every adapter and optimizer state as it was."""

    @abstractmethod
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Collective: everything a checkpoint holds (tensors keyed by adapter key, JSON state)."""

    @abstractmethod
    def adapters(self) -> dict[str, torch.Tensor]:
        """Collective: the whole model's adapters (peft keys)."""

    @abstractmethod
    def finish(self) -> dict:
        """Collective, once at the end: per-rank rows and the mode's own summary fields."""

    adapter_config: dict  # peft adapter_config.json of the whole model (lead rank)


def _due(every: int, done: int, per_unit: int) -> bool:
    """Whether a multiple of ``every`` steps falls in the unit that ended after ``done`` steps."""
    return every > 0 and done // every > (done - per_unit) // every


def drive(cfg: Config, trainer: Trainer, resume: tuple[Path, dict] | None) -> dict | None:
    """Train ``trainer`` from ``resume`` (the lead's checkpoint directory and manifest) or from scratch; return
    the summary on the lead rank. Every rank calls this."""
    tr, lead, out = trainer, trainer.is_lead, Path(cfg.run.out_dir)
    per_unit = tr.steps_per_unit
    units = cfg.run.steps // per_unit
    manifest = resume[1] if resume else None
    # only the lead holds the checkpoint: every rank learns from start() whether and where the run continues
    resumed = tr.start((manifest["step"], checkpoint.load_tensors(resume[0]), manifest["state"]) if resume else None)
    start_step = resumed or 0
    start_unit = start_step // per_unit

    recorder = RunRecorder(cfg, enabled=lead, keep_steps=start_step if resumed is not None else None)
    if resumed is None:
        init = tr.adapters()
        if lead:
            save_adapters(out / "adapter_init", init, tr.adapter_config)
    counters = dict(manifest["driver"]) if manifest else {"tokens": 0, "train_s": 0.0, "loss": None,
                                                          "skipped_steps": [], "eval_before": {}}
    if resumed is None and tr.has_eval:
        counters["eval_before"] = tr.evaluate()
    before = counters["eval_before"]
    if lead and before:
        log.info("eval before training: %s", fmt(before))
    if lead and resumed is not None:
        log.info("resuming after step %d from %s", start_step, resume[0])

    begin = time.perf_counter()
    bar = progress(cfg.run.steps, enabled=lead)
    bar.update(start_step)
    stopped, evaluated = None, None
    for unit in range(start_unit, units):
        t0 = time.perf_counter()
        result = tr.train_unit(unit)
        done = (unit + 1) * per_unit
        stop = result.nonfinite is not None and cfg.optim.on_nonfinite == "stop"
        evaluated = result.evaluated
        if not stop:  # a stopped unit counts for nothing: the checkpoint holds the state before it
            counters["train_s"] += time.perf_counter() - t0
            counters["tokens"] += result.tokens
            if result.loss is not None:
                counters["loss"] = result.loss
        if result.nonfinite and not stop:
            counters["skipped_steps"] = counters["skipped_steps"] + [r["step"] for r in result.records
                                                                       if r.get("skipped")]
            if lead:
                log.warning("%s; the update is skipped on every rank (optim.on_nonfinite=skip)", result.nonfinite)
        if not stop and tr.has_eval and _due(cfg.run.eval_every, done, per_unit) and unit + 1 < units:
            ev = evaluated or tr.evaluate()
            if lead and result.records:
                result.records[-1].update(ev)
        note = result.records[-1].get("note", "") if result.records else ""
        for record in result.records:
            record.pop("note", None)
            record.setdefault("tokens", counters["tokens"])
            record.setdefault("elapsed_s", counters["train_s"])
            recorder.step(record)
        if stop:
            stopped = f"{result.nonfinite}; stopped before any update (optim.on_nonfinite=stop)"
            if lead:
                log.error("%s", stopped)
            _save_checkpoint(cfg, tr, unit * per_unit, counters)
            break
        bar.update(per_unit)
        if lead and (done % cfg.run.log_every < per_unit or unit + 1 == units) and counters["loss"] is not None:
            log.info("step %d/%d loss %.4f tokens/s %.0f %s", done, cfg.run.steps, counters["loss"],
                     counters["tokens"] / max(counters["train_s"], 1e-9), note)
        if _due(tr.checkpoint_every, done, per_unit):
            _save_checkpoint(cfg, tr, done, counters)
    bar.close()
    wall = time.perf_counter() - begin
    after = (evaluated or tr.evaluate()) if tr.has_eval and not stopped else {}
    final = tr.adapters()
    own = tr.finish()
    if not lead:
        if stopped:
            raise NonFiniteError(stopped)
        return None
    save_adapters(out / "adapter", final, tr.adapter_config)
    loss = counters["loss"]
    summary = {
        "mode": tr.mode, "world_size": tr.world_size, "steps": cfg.run.steps,
        "final_loss": loss if loss is not None else math.nan,
        **({"eval_loss": after["eval_loss"], "eval_before": before, "eval_after": after} if after else {}),
        "tokens": counters["tokens"], "tokens_per_s": counters["tokens"] / max(counters["train_s"], 1e-9), "wall_s": wall,
        "train_s": counters["train_s"], "skipped_steps": counters["skipped_steps"],
        "adapter_params": sum(v.numel() for v in final.values()),
        **({"resumed_from_step": start_step} if resumed is not None else {}),
        **({"stopped": stopped} if stopped else {}),
        **own,
    }
    recorder.summary(summary)
    if after:
        log.info("eval after training: %s (before: %s)", fmt(after), fmt(before))
    if stopped:
        raise NonFiniteError(stopped)
    return summary


def _save_checkpoint(cfg: Config, tr: Trainer, step: int, counters: dict) -> None:
    tensors, state = tr.state()
    if tr.is_lead:
        checkpoint.save(cfg.run.out_dir, step, tensors, {
            "family": checkpoint.family(cfg.pipeline.mode), "mode": tr.mode, "world_size": tr.world_size,
            "config": checkpoint.config_fingerprint(cfg), "driver": counters, "state": state})


def fmt(record: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, (int, float)))
