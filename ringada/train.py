"""Training pieces shared by every mode: unfreezing, the loss, adapter blocks, clipping, outputs, data.

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
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from . import config as config_mod
from .adapters import Adapters
from .config import Config, UnfreezeConfig
from .schedule import trainable_blocks
from .data import Batch, Dataset, load_dataset
from .models import CutModel, load_tokenizer

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ schedule math


def trainable_count(cfg: UnfreezeConfig, num_blocks: int, step: int, epoch: int, plateaus: int) -> int:
    """Trainable top blocks at optimizer step ``step`` (DESIGN: min(L, initial + increment * floor(s / every)));
    ``by`` picks what is counted: steps, epochs, or plateaus (each plateau counts as ``every``)."""
    counter = {"steps": step, "epochs": epoch, "plateau": plateaus * cfg.every}[cfg.by]
    return trainable_blocks(counter, num_blocks, cfg.initial, cfg.every, cfg.increment)


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


HEAD_CHUNK_TOKENS = 256  # a causal LM's head runs on this many tokens at a time (Note: chunked head)
PLAIN_HEAD_LOGITS = 2**20  # logits up to this many elements go through plain autograd (small models, tests)


def head_loss(cut, hidden: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor,
              chunk_tokens: int = HEAD_CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """(loss sum, correct predictions) of the head on ``hidden``: what ``loss_sum(cut.head(hidden, mask),
    labels)`` gives, without ever holding a causal LM's full [B, T, vocab] logits (Note: chunked head).

    Note (chunked head). A causal LM's logits are the largest tensor of a step (tokens x vocab, 49k for
    SmolLM2): materialized for a whole batch, and kept for backward, they dominated the peak memory of the rank
    holding the head (an sft server holds every device's batch at once). Only positions with a target run the
    head, :data:`HEAD_CHUNK_TOKENS` at a time; when a gradient is needed, each chunk's gradient with respect to
    its hidden states is taken right away (the loss is the end of the graph, so backward only scales it), and
    the chunk's logits are dropped. The head's own weights are frozen in a causal LM (adapters live in the
    blocks), so nothing else needs a gradient. A chunk holds one logits buffer: its loss is logsumexp minus the
    target's logit, and its gradient, softmax minus one-hot, is written over the logits. The values agree with
    cross-entropy's to rounding; logits of at most :data:`PLAIN_HEAD_LOGITS` elements (a small model's) go
    through cross-entropy and autograd as they are, the same arithmetic to the last bit.
    """
    if cut.family.task != "causal_lm" or hidden.dim() != 3:
        logits = cut.head(hidden, mask)
        return loss_sum(logits, labels), correct_count(logits.detach(), labels)
    assert not any(p.requires_grad for n in cut.family.head_names()
                   for p in cut.model.get_submodule(n).parameters()), "a trainable LM head needs the full logits"
    targets = labels[:, 1:].reshape(-1)
    rows = (targets != -100).nonzero().squeeze(1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, rows)
    y = targets.index_select(0, rows)
    if h.shape[0] * cut.model.config.vocab_size <= PLAIN_HEAD_LOGITS:  # loss_sum's arithmetic to the last bit
        logits = cut.head(h[None], None)[0]
        return (nn.functional.cross_entropy(logits.float(), y, reduction="sum"),
                int((logits.detach().argmax(-1) == y).sum()))
    out = _ChunkedHeadLoss.apply(h, y, lambda x: cut.head(x[None], None)[0], chunk_tokens)
    return out[0], int(out[1])


class _ChunkedHeadLoss(torch.autograd.Function):
    """Sum of cross-entropy of ``head(h)`` against ``y`` (and the argmax hits), chunk by chunk (Note: chunked
    head); the gradient with respect to ``h`` is computed in forward when ``h`` requires one.

    Per chunk one logits buffer: the loss is logsumexp - the target's logit (cross-entropy's own formula), and
    the gradient with respect to the logits, softmax - one-hot, is written over them before it goes back
    through the head (whose backward needs its input and weights, never its output)."""

    @staticmethod
    def forward(ctx, h, y, head, chunk):
        need_grad = h.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = 0
        grads = []
        for i in range(0, h.shape[0], chunk):
            part, target = h[i:i + chunk].detach(), y[i:i + chunk]
            with torch.enable_grad() if need_grad else torch.no_grad():
                if need_grad:
                    part.requires_grad_(True)
                out = head(part)
            logits = out.detach().float()  # the same storage in fp32: the gradient overwrites it below
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            correct += int((logits.argmax(-1) == target).sum())
            if need_grad:
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(target.shape[0], device=grad.device), target] -= 1
                grads.append(torch.autograd.grad(out, part, grad.to(out.dtype))[0])
            del out, logits
        if need_grad:
            ctx.save_for_backward(torch.cat(grads) if grads else torch.zeros_like(h))
        hits = torch.tensor(correct)
        ctx.mark_non_differentiable(hits)
        return total, hits

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_total, None, None, None


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
               grad: bool, training: bool, seed: int = 0, step: int = 0, micro_batch: int = 0,
               dropout: bool = False, recompute: bool = False):
    """Run blocks [lo, hi). With ``grad``, blocks at or above the frontier build a graph; the others run under
    no_grad (no graph, no stored activations). ``training`` turns adapter dropout on, seeded per (seed, step,
    micro-batch, block) so that any process running the block draws the same mask. ``recompute``: a block with a
    graph keeps only its input and runs again in the backward (activation checkpointing, the RNG state
    restored, so the same values and the same dropout masks)."""
    set_adapter_dropout(cut.model, training and dropout)
    for i in range(lo, hi):
        if dropout and training:
            torch.manual_seed(dropout_seed(seed, step, micro_batch, i))
        if grad and i >= frontier and recompute:
            hidden = torch.utils.checkpoint.checkpoint(cut.run_block, i, hidden, ctx, use_reentrant=False)
            continue
        with nullcontext() if grad and i >= frontier else torch.no_grad():
            hidden = cut.run_block(i, hidden, ctx)
    return hidden


def set_adapter_dropout(model: nn.Module, active: bool) -> None:
    """Adapter dropout modules follow training/eval (the frozen base always runs in eval mode)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and ("lora_dropout" in name or "bottleneck" in name):
            module.train(active)


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


def rss_bytes() -> int:
    """The process's resident memory now (Linux /proc; elsewhere the peak so far)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return peak_rss_bytes()


# ------------------------------------------------------------------------------------------------------ outputs


class RunRecorder:
    """Writes config.yaml, metrics.jsonl and summary.json in run.out_dir (on the logging rank only)."""

    def __init__(self, cfg: Config, enabled: bool = True, keep_steps: int | None = None):
        """``keep_steps``: a resumed run keeps the metrics of its first ``keep_steps`` steps and appends."""
        self.enabled = enabled
        self.out = Path(cfg.run.out_dir)
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(config_mod.dump(cfg))
            path = self.out / "metrics.jsonl"
            kept = _steps_before(path, keep_steps) if keep_steps is not None and path.is_file() else []
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)  # the earlier history is never lost half-way
            self._metrics = open(path, "a")

    def step(self, record: dict) -> None:
        if self.enabled:
            self._metrics.write(json.dumps(json_safe(record)) + "\n")
            self._metrics.flush()

    def summary(self, summary: dict) -> None:
        if self.enabled:
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(json_safe(summary), indent=2))
            tmp.replace(self.out / "summary.json")
            self._metrics.close()


def json_safe(value):
    """Strict JSON: NaN and Infinity (which json.dumps would write, and strict readers refuse) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _steps_before(path: Path, step: int) -> list[str]:
    """metrics.jsonl lines of steps before ``step`` (a line cut short by a crash is dropped)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", step) < step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    return kept


def progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled or not sys.stderr.isatty(), unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ data plumbing


@dataclass
class RunData:
    train: Dataset
    eval: Dataset | None
    num_labels: int


def load_split(cfg: Config, split: str, vocab_size: int, tokenizer=None) -> Dataset:
    """data.train or data.eval (``split``), tokenized for model.path and checked against its vocabulary."""
    tokenizer = tokenizer or load_tokenizer(cfg.model.path)
    ds = load_dataset(getattr(cfg.data, split), split, task=cfg.model.task, seq_len=cfg.data.seq_len,
                      tokenizer=tokenizer, num_labels=cfg.model.num_labels)
    if int(ds.input_ids.max()) >= vocab_size:
        raise ValueError(f"data.{split}: token id {int(ds.input_ids.max())} >= the model's vocab size {vocab_size}")
    return ds


def load_run_data(cfg: Config, vocab_size: int) -> RunData:
    tokenizer = load_tokenizer(cfg.model.path)
    train = load_split(cfg, "train", vocab_size, tokenizer)
    eval_set = load_split(cfg, "eval", vocab_size, tokenizer) if cfg.data.eval else None
    if train.batches_per_epoch(cfg.data.batch_size) == 0:
        raise ValueError(f"data.batch_size: got {cfg.data.batch_size} but {cfg.data.train} has only {len(train)} "
                         f"sequences of data.seq_len={cfg.data.seq_len}; lower one of them")
    return RunData(train=train, eval=eval_set, num_labels=cfg.model.num_labels)


def input_tokens(batch: Batch) -> int:
    if batch.attention_mask is not None:
        return int(batch.attention_mask.sum())
    return batch.input_ids.numel()


def eval_record(loss_sum_value: float, count: int, correct: int, task: str) -> dict:
    loss = loss_sum_value / max(count, 1)
    if task == "classification":
        return {"eval_loss": loss, "eval_accuracy": correct / max(count, 1)}
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


