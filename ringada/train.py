"""Training pieces shared by every mode, and the single-process trainer (the baseline all modes must match).

Loss (Note: token-weighted loss): every micro-batch contributes ``sum of per-target losses / targets in the whole
global batch``, so the accumulated gradient equals that of the mean over the global batch for any micro-batch
split, any partition and any topology.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import config as config_mod
from .adapters import Adapters, add_adapters, save_adapters
from .config import Config, UnfreezeConfig
from .data import Batch, Dataset, load_dataset
from .models import CutModel, load_model, load_tokenizer, num_blocks_of, resolve_model_dir

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ schedule math


def trainable_count(cfg: UnfreezeConfig, num_blocks: int, step: int, epoch: int, plateaus: int) -> int:
    """Trainable top blocks at optimizer step ``step`` (DESIGN: min(L, initial + increment * floor(s / every)))."""
    if cfg.every == 0:
        return num_blocks
    counter = {"steps": step // cfg.every, "epochs": epoch // cfg.every, "plateau": plateaus}[cfg.by]
    return min(num_blocks, cfg.initial + cfg.increment * counter)


@dataclass
class Unfreezer:
    """Tracks the frontier; by=plateau counts evals without an improvement of min_delta."""

    cfg: UnfreezeConfig
    num_blocks: int
    plateaus: int = 0
    best: float = math.inf
    stale: int = 0

    def trainable(self, step: int, epoch: int) -> int:
        return trainable_count(self.cfg, self.num_blocks, step, epoch, self.plateaus)

    def frontier(self, step: int, epoch: int) -> int:
        return self.num_blocks - self.trainable(step, epoch)

    def observe(self, loss: float) -> None:
        """Feed one monitored loss (by=plateau)."""
        if loss < self.best - self.cfg.min_delta:
            self.best, self.stale = loss, 0
            return
        self.stale += 1
        if self.stale >= self.cfg.patience:
            self.plateaus, self.stale = self.plateaus + 1, 0


# ------------------------------------------------------------------------------------------------------- losses


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-target cross-entropy: next-token for [B, T, V] logits, per-example for [B, C]."""
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> int:
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != -100
        return int((logits.argmax(-1)[keep] == labels[keep]).sum())
    return int((logits.argmax(-1) == labels).sum())


def dropout_seed(seed: int, step: int, micro_batch: int, block: int) -> int:
    """RNG seed for block ``block``'s adapter dropout in one micro-batch, independent of who runs the block."""
    return zlib.crc32(f"{seed}/{step}/{micro_batch}/{block}".encode())


def run_blocks(cut: CutModel, lo: int, hi: int, hidden: torch.Tensor, ctx: dict, *, frontier: int,
               train: bool, seed: int = 0, step: int = 0, micro_batch: int = 0, dropout: bool = False):
    """Run blocks [lo, hi). Blocks below the frontier run under no_grad (no graph, no stored activations)."""
    for i in range(lo, hi):
        grad = train and i >= frontier
        if dropout and train:
            torch.manual_seed(dropout_seed(seed, step, micro_batch, i))
        with nullcontext() if grad else torch.no_grad():
            hidden = cut.run_block(i, hidden, ctx)
    return hidden


def clip_coefficient(total_sq_norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor, from the squared global norm (summed across ranks)."""
    return min(1.0, max_norm / (math.sqrt(total_sq_norm) + 1e-6))


def make_optimizer(cfg: Config, adapters: Adapters) -> torch.optim.Optimizer | None:
    """AdamW over every adapter tensor from the start: a frozen one has no grad, so AdamW skips it entirely (no
    state, no weight decay), exactly as in a single process where it never had a gradient."""
    params = [p.param for p in adapters.params]
    if not params:
        return None
    o = cfg.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             foreach=False)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------------ outputs


class RunRecorder:
    """Writes config.yaml, metrics.jsonl and summary.json in run.out_dir (on the logging rank only)."""

    def __init__(self, cfg: Config, enabled: bool = True):
        self.enabled = enabled
        self.out = Path(cfg.run.out_dir)
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(config_mod.dump(cfg))
            self._metrics = open(self.out / "metrics.jsonl", "w")

    def step(self, record: dict) -> None:
        if self.enabled:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def summary(self, summary: dict) -> None:
        if self.enabled:
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(self.out / "summary.json")
            self._metrics.close()


def progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled or not sys.stderr.isatty(), unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ data plumbing


@dataclass
class RunData:
    train: Dataset
    eval: Dataset | None
    num_labels: int


def load_run_data(cfg: Config, vocab_size: int) -> RunData:
    tokenizer = load_tokenizer(cfg.model.path)
    kw = dict(task=cfg.model.task, seq_len=cfg.data.seq_len, tokenizer=tokenizer, num_labels=cfg.model.num_labels)
    train = load_dataset(cfg.data.train, "train", **kw)
    eval_set = load_dataset(cfg.data.eval, "eval", **kw) if cfg.data.eval else None
    for key, ds in (("data.train", train), ("data.eval", eval_set)):
        if ds is not None and int(ds.input_ids.max()) >= vocab_size:
            raise ValueError(f"{key}: token id {int(ds.input_ids.max())} >= the model's vocab size {vocab_size}")
    if train.batches_per_epoch(cfg.data.batch_size) == 0:
        raise ValueError(f"data.batch_size: got {cfg.data.batch_size} but {cfg.data.train} has only {len(train)} "
                         f"sequences of data.seq_len={cfg.data.seq_len}; lower one of them")
    return RunData(train=train, eval=eval_set, num_labels=cfg.model.num_labels)


def input_tokens(batch: Batch) -> int:
    if batch.attention_mask is not None:
        return int(batch.attention_mask.sum())
    return batch.input_ids.numel()


# ------------------------------------------------------------------------------------------------ single process


@dataclass
class Timers:
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    extra: dict = field(default_factory=dict)


class SingleProcess:
    """Holds the whole model; computes one global batch's loss and gradients."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model_dir = str(resolve_model_dir(cfg.model.path))
        self.cut = load_model(cfg.model.path, cfg.model.task, cfg.model.num_labels, seed=cfg.run.seed)
        self.adapters = add_adapters(self.cut, cfg.adapter, cfg.run.seed, base_dir=self.model_dir)
        self.head_trainable = any(p.block is None for p in self.adapters.params)
        self.timers = Timers()

    def forward(self, batch: Batch, *, frontier: int, train: bool, step: int = 0, micro_batch: int = 0):
        cut, cfg = self.cut, self.cfg
        with torch.no_grad():
            hidden = cut.embed(batch.input_ids)
            ctx = cut.context(hidden, batch.attention_mask)
        hidden = run_blocks(cut, 0, cut.num_blocks, hidden, ctx, frontier=frontier, train=train, seed=cfg.run.seed,
                            step=step, micro_batch=micro_batch, dropout=cfg.adapter.dropout > 0)
        anything_trains = train and (frontier < cut.num_blocks or self.head_trainable)
        with nullcontext() if anything_trains else torch.no_grad():
            return cut.head(hidden, batch.attention_mask)

    def train_step(self, batch: Batch, frontier: int, step: int) -> tuple[float, int]:
        """Accumulate gradients of the token-weighted global-batch loss; returns (loss, counted targets)."""
        micro = batch.split(self.cfg.data.micro_batches)
        total = batch.count()
        loss_value = 0.0
        for m, mb in enumerate(micro):
            t0 = time.perf_counter()
            logits = self.forward(mb, frontier=frontier, train=True, step=step, micro_batch=m)
            loss = loss_sum(logits, mb.labels) / total
            t1 = time.perf_counter()
            if loss.requires_grad:
                loss.backward()
            t2 = time.perf_counter()
            self.timers.fwd_s += t1 - t0
            self.timers.bwd_s += t2 - t1
            loss_value += loss.item()
        return loss_value, total

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> dict:
        loss, count, correct = 0.0, 0, 0
        for b in batches:
            logits = self.forward(b, frontier=self.cut.num_blocks, train=False)
            loss += float(loss_sum(logits, b.labels))
            count += b.count()
            correct += correct_count(logits, b.labels)
        return eval_record(loss, count, correct, self.cfg.model.task)


def eval_record(loss_sum_value: float, count: int, correct: int, task: str) -> dict:
    loss = loss_sum_value / max(count, 1)
    if task == "classification":
        return {"eval_loss": loss, "eval_accuracy": correct / max(count, 1)}
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def run_single(cfg: Config) -> dict:
    """Train in one process; write the output contract; return the summary."""
    config_mod.check_against_model(cfg, num_blocks_of(cfg.model.path), world_size=1)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    engine = SingleProcess(cfg)
    data = load_run_data(cfg, engine.cut.model.config.vocab_size)
    L = engine.cut.num_blocks
    unfreezer = Unfreezer(cfg.unfreeze, L)
    optimizer = make_optimizer(cfg, engine.adapters)
    recorder = RunRecorder(cfg)
    out = Path(cfg.run.out_dir)
    save_adapters(out / "adapter_init", engine.adapters.state_dict(), engine.adapters.config_json)
    eval_batches = data.eval.eval_batches(cfg.data.batch_size, cfg.run.eval_batches) if data.eval else []

    before = engine.evaluate(eval_batches) if eval_batches else {}
    if before:
        log.info("eval before training: %s", _fmt(before))
    start = time.perf_counter()
    tokens_total, last_eval, loss = 0, before, float("nan")
    monitor_losses: list[float] = []
    bar = progress(cfg.run.steps, enabled=True)
    for step in range(cfg.run.steps):
        epoch, batch = data.train.batch_at(step, cfg.data.batch_size, cfg.data.shuffle, cfg.run.seed)
        trainable = unfreezer.trainable(step, epoch)
        frontier = L - trainable
        engine.adapters.set_frontier(frontier)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss, _ = engine.train_step(batch, frontier, step)
        if cfg.optim.grad_clip > 0:
            grads = [p.grad for p in engine.adapters.trainable() if p.grad is not None]
            coef = clip_coefficient(sum(float(g.pow(2).sum()) for g in grads), cfg.optim.grad_clip)
            for g in grads:
                g.mul_(coef)
        if optimizer is not None:
            optimizer.step()
        tokens_total += input_tokens(batch)
        record = {"step": step, "loss": loss, "trainable_blocks": trainable, "frontier": frontier, "epoch": epoch,
                  "tokens": tokens_total, "elapsed_s": time.perf_counter() - start}
        monitor_losses.append(loss)
        if eval_batches and cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and step + 1 < cfg.run.steps:
            last_eval = engine.evaluate(eval_batches)
            record.update(last_eval)
        if cfg.unfreeze.by == "plateau" and cfg.unfreeze.every and (step + 1) % cfg.unfreeze.every == 0:
            unfreezer.observe(_plateau_signal(engine, eval_batches, monitor_losses))
            monitor_losses = []
        recorder.step(record)
        bar.update(1)
        if (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.run.steps:
            log.info("step %d/%d loss %.4f trainable %d/%d tokens/s %.0f", step + 1, cfg.run.steps, loss, trainable,
                     L, tokens_total / max(record["elapsed_s"], 1e-9))
    bar.close()
    wall = time.perf_counter() - start
    after = engine.evaluate(eval_batches) if eval_batches else {}
    save_adapters(out / "adapter", engine.adapters.state_dict(), engine.adapters.config_json)
    summary = {
        "mode": "single", "world_size": 1, "steps": cfg.run.steps, "final_loss": loss,
        **({"eval_loss": after["eval_loss"], "eval_before": before, "eval_after": after} if after else {}),
        "tokens_per_s": tokens_total / wall, "wall_s": wall, "num_blocks": L,
        "adapter_params": engine.adapters.numel(),
        "ranks": [{"rank": 0, "blocks": [0, L], "fwd_s": engine.timers.fwd_s, "bwd_s": engine.timers.bwd_s,
                   "bytes_sent": 0, "bytes_recv": 0, "peak_rss_bytes": peak_rss_bytes()}],
    }
    recorder.summary(summary)
    if after:
        log.info("eval after training: %s (before: %s)", _fmt(after), _fmt(before))
    return summary


def _plateau_signal(engine, eval_batches, train_losses) -> float:
    if eval_batches:
        return engine.evaluate(eval_batches)["eval_loss"]
    return sum(train_losses) / len(train_losses)


def _fmt(record: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in record.items())
