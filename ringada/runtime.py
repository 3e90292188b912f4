"""Executes pipeline plans. One runtime serves `single` (one stage), `ring` and `line`.

Every rank runs the same loop: rank 0 (the initiator) owns the data and decides each step's frontier, which it
broadcasts as a small int64 tensor; then every rank builds the same plan (``schedule.build_schedule``) and executes
its own action list literally. Only the stages of a rank that the plan marks as doing backward build autograd
graphs; a rank wholly below the frontier runs forward under ``no_grad`` and its plan holds no gradient messages.

Per-step scalars (loss sum, counted targets, correct predictions, squared gradient norm) are summed with one
all_reduce of a float64 tensor, so the head's loss reaches rank 0 in line mode and clipping uses the global norm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from . import config as config_mod
from . import schedule as sched
from .adapters import add_adapters, check_target_modules
from .comm import (ACT, ADAPTERS, CHECKPOINT, GRAD, KIND_NAMES, LABELS, Counters, PeerError, Placement, Wire,
                   collective, decode_names, encode_names, link_group, pack_state, unpack_state)
from .compress import SmashedCodec, link_codecs
from .config import Config, ConfigError
from .data import Batch
from .models import load_model, num_blocks_of, read_config, resolve_model_dir
from .partition import PLANNED, block_ranges, check_memory, even_partition, head_cost_in_blocks, plan_capacity, \
    plan_fastest
from .driver import Trainer, UnitResult
from .train import (Unfreezer, clip_coefficient, eval_record, head_loss, input_tokens, load_run_data,
                    make_optimizer, peak_rss_bytes, run_blocks)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- topology


@dataclass
class Topology:
    """Who holds what. Built before any process group exists, so every config error surfaces first."""

    mode: str  # single | ring | line
    rank: int
    world_size: int
    partition: list[int]
    stages: list[sched.Stage]

    @property
    def plan_mode(self) -> str:
        return "ring" if self.mode == "ring" else "line"  # a single process is a one-stage line

    @property
    def my_stages(self) -> list[sched.Stage]:
        return [s for s in self.stages if s.rank == self.rank]

    @property
    def is_initiator(self) -> bool:
        return self.rank == 0

    @property
    def holds_embed(self) -> bool:
        return any(s.has_embed for s in self.my_stages)

    @property
    def holds_head(self) -> bool:
        return any(s.has_head for s in self.my_stages)

    @property
    def blocks(self) -> tuple[int, int]:
        return block_ranges(self.partition)[self.rank]

    @property
    def head_rank(self) -> int:
        return next(s.rank for s in self.stages if s.has_head)


def make_topology(cfg: Config, rank: int, world_size: int, partition: list[int] | None = None) -> Topology:
    """Who holds what; ``partition`` overrides pipeline.partition (a capacity plan agreed on at start-up)."""
    mode = cfg.pipeline.mode
    assert mode in ("single", "ring", "line"), f"the pipeline runtime does not run mode {mode}"
    if mode in ("ring", "line") and world_size < 2:
        raise ConfigError(f"pipeline.mode: got {mode!r} with WORLD_SIZE={world_size}; run it under torchrun with "
                          f">= 2 ranks (torchrun --nproc-per-node 4 -m ringada train ...), or use mode single")
    num_blocks = num_blocks_of(cfg.model.path)
    config_mod.check_against_model(cfg, num_blocks, world_size)
    if cfg.pipeline.compress and cfg.compress.hadamard:
        config_mod.check_compress_against_model(cfg, read_config(cfg.model.path).hidden_size)
    part = cfg.pipeline.partition
    if partition is None:
        if mode == "single":
            partition = [num_blocks]
        elif part == "even":
            partition = even_partition(num_blocks, world_size, mode,
                                       head_cost_in_blocks(cfg.model.path, cfg.model.task, cfg.model.num_labels))
        elif part in PLANNED:
            try:
                partition = _planned_partition(cfg, world_size, log_it=rank == 0)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        else:
            partition = list(part)
    if cfg.pipeline.profile and part not in PLANNED and mode != "single":
        try:
            check_memory(cfg, partition)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return Topology(mode=mode, rank=rank, world_size=world_size, partition=partition,
                    stages=sched.build_stages("ring" if mode == "ring" else "line", partition))


def plan_speeds(cfg: Config, world_size: int) -> list[float] | None:
    """The ranks' relative speeds from pipeline.profile, for rank 0's order in the plans (every rank reads the
    same file, so they build the same plans); None without a profile for these ranks."""
    if not cfg.pipeline.profile or cfg.pipeline.mode not in ("ring", "line"):
        return None
    from .profiles import load_profile

    profile = load_profile(cfg.pipeline.profile)
    if len(profile.devices) != world_size:
        return None
    return profile.device_speeds()


# ------------------------------------------------------------------------------------------------------ runtime


@dataclass
class RankTimers:
    """Training only (eval is not counted): wall seconds in forward and backward compute and in the optimizer
    step, and the process's CPU seconds (all threads) over whole training steps."""

    fwd_s: float = 0.0
    bwd_s: float = 0.0
    step_s: float = 0.0
    train_cpu_s: float = 0.0
    train_bytes_sent: int = 0  # bytes this rank put on the wire during training steps (no eval, no gathering)
    lookahead_mb: int = 0  # micro-batches of a next step's first stage run while waiting (pipeline.lookahead)


@dataclass(frozen=True)
class Ahead:
    """The next training step, as the initiator knows it before it starts (pipeline.lookahead)."""

    step: int
    frontier: int  # its block frontier
    batch: Batch


@dataclass
class AheadForward:
    """A next-step micro-batch's stage-0 forward, run ahead (pipeline.lookahead) up to block ``block``: what the
    next step's forward continues from."""

    hidden: torch.Tensor
    mask: torch.Tensor | None
    ctx: dict
    block: int


@dataclass
class StepStats:
    loss: float = 0.0  # sum of this rank's scaled micro-batch losses (train) or loss sums (eval)
    count: int = 0
    correct: int = 0
    nonfinite_mb: int = -1  # the first micro-batch whose loss was NaN or Inf (head rank), or -1


class PipelineRuntime:
    """One rank's slice of the model, its adapters and optimizer, and the executor of plans."""

    def __init__(self, cfg: Config, topo: Topology, place: Placement = Placement()):
        self.cfg, self.topo, self.device = cfg, topo, place.device
        self.model_dir = str(resolve_model_dir(cfg.model.path))
        self.cut = load_model(cfg.model.path, cfg.model.task, cfg.model.num_labels, blocks=topo.blocks,
                              embed=topo.holds_embed, head=topo.holds_head, seed=cfg.run.seed,
                              dtype=base_dtype(cfg))
        # adapters are drawn on the CPU (the same values wherever the rank computes), then everything moves
        self.adapters = add_adapters(self.cut, cfg.adapter, cfg.run.seed, base_dir=self.model_dir)
        self.cut.model.to(self.device)
        self.optimizer = make_optimizer(cfg, self.adapters)
        self.num_blocks = self.cut.num_blocks
        # A classification head always trains; the frontier alone decides for a causal LM.
        self.head_trainable = cfg.model.task == "classification"
        self.head_cost = head_cost_in_blocks(cfg.model.path, cfg.model.task, cfg.model.num_labels)  # for plans
        self.speeds = plan_speeds(cfg, topo.world_size)
        self.slowdown, link_delay = 0.0, None
        if cfg.pipeline.emulate:
            from .profiles import load_profile

            profile = load_profile(cfg.pipeline.profile)
            self.slowdown = emulated_slowdown(profile.speed(profile.devices[topo.rank].gflops))
            link_delay = profile.link_seconds
        self.wire = Wire(topo.rank, self.device, data_groups=place.data_groups, timeout_s=cfg.run.timeout_s,
                         log_messages=cfg.run.message_log, link_delay=link_delay) if topo.world_size > 1 else None
        # the training step's sum, apart from the messages' group: posted while sends may be in flight (lookahead)
        self.step_group = link_group(list(range(topo.world_size)), cfg.run.timeout_s) \
            if topo.world_size > 1 and dist.is_initialized() else None
        self.timers = RankTimers()
        self._plans: dict[tuple, sched.Plan] = {}
        # pipeline.lookahead: (step, micro-batch) -> stage 0's forward, run (or begun) in the previous step's tail
        self._ahead: dict[tuple[int, int], AheadForward] = {}
        # pipeline.compress: ACT and GRAD payloads through the compress section's codecs (error feedback, when on,
        # per (peer, micro-batch) stream); evaluations only with compress.eval=codec
        self.smash = SmashedCodec(link_codecs(cfg.compress), cfg.run.seed) if cfg.pipeline.compress else None
        self.eval_codec = cfg.compress.eval == "codec"

    # -- plans
    def plan(self, micro_batches: int, frontier: int, train: bool) -> sched.Plan:
        """The schedule of one global batch; its frontier is where backward stops (the block frontier, or 0
        with pipeline.early_stop false)."""
        if not train:
            frontier, head_trainable = self.num_blocks, False
        else:
            head_trainable = self.head_trainable
            if not self.cfg.pipeline.early_stop:
                frontier = 0
        key = (micro_batches, frontier, head_trainable)
        if key not in self._plans:
            self._plans[key] = sched.build_schedule(self.topo.plan_mode, self.topo.partition, micro_batches,
                                                    frontier, head_trainable, self.cfg.pipeline.schedule,
                                                    head_cost=self.head_cost, speeds=self.speeds)
        return self._plans[key]

    # -- control plane
    def broadcast_ints(self, values: list[int] | None, length: int, step: int) -> list[int]:
        """Rank 0's ``values`` on every rank (a tensor broadcast; identity in one process)."""
        if self.topo.world_size == 1:
            return list(values)
        t, t0 = torch.tensor(values if values is not None else [0] * length, dtype=torch.int64), time.perf_counter()
        with collective(self.topo.rank, "receiving the initiator's step plan", step, self.cfg.run.timeout_s):
            dist.broadcast(t, src=0)
        self._waited(t0)
        return t.tolist()

    def _waited(self, since: float) -> None:
        """Time blocked in a collective counts as waiting, as in a receive (the summary's wait_s)."""
        if self.wire is not None:
            self.wire.counters.wait_s += time.perf_counter() - since

    def all_reduce_sum(self, values: list[float], step: int, action: str,
                       meanwhile: Iterator[int] | None = None, group=None) -> list[float]:
        """The sum over ranks of ``values`` (in ``group``: default, the world's). ``meanwhile``: work to run, one
        item at a time, for as long as the sum has not arrived (other ranks are still computing); what it did
        not reach is left undone."""
        if self.topo.world_size == 1:
            return values
        t, t0 = torch.tensor(values, dtype=torch.float64), time.perf_counter()
        with collective(self.topo.rank, action, step, self.cfg.run.timeout_s):
            work = dist.all_reduce(t, group=group, async_op=meanwhile is not None)
        if meanwhile is not None:
            while not work.is_completed() and next(meanwhile, None) is not None:
                pass
            t0 = time.perf_counter()  # the work done meanwhile is computing, not waiting
            with collective(self.topo.rank, action, step, self.cfg.run.timeout_s):
                work.wait()
        self._waited(t0)
        return t.tolist()

    # -- the executor
    def execute(self, plan: sched.Plan, step: int, train: bool, micro: list[Batch] | None,
                labels: list[torch.Tensor] | None, total: int, flush: bool = True) -> StepStats:
        """Run this rank's action list for one global batch. ``micro`` (the initiator) are the micro-batches;
        ``labels`` (the head holder) their labels; ``total`` the targets counted in the whole batch. ``flush``
        false leaves this rank's last sends in flight (the caller flushes them)."""
        rank, wire, stages, backward = self.topo.rank, self.wire, plan.stages, plan.backward
        actions = plan.actions[rank]
        inputs, outputs, masks, grads, losses = {}, {}, {}, {}, {}
        stats = StepStats()
        for a in actions:
            key = (a.stage, a.mb)
            try:
                if a.kind == sched.RECV_F:
                    tensors = wire.recv(a.peer, ACT, step, a.mb)
                    hidden = self._unpack(tensors[0])
                    if train and backward[a.stage - 1]:
                        hidden.requires_grad_(True)  # its gradient goes back down
                    inputs[key] = hidden
                    masks[key] = tensors[1] if len(tensors) > 1 else None
                elif a.kind == sched.F:
                    t0 = time.perf_counter()
                    stats_mb = self._forward(stages[a.stage], a.mb, key, step, train, train and backward[a.stage],
                                             plan, micro, labels, total, inputs, masks, outputs, losses)
                    stats.loss += stats_mb[0]
                    stats.correct += stats_mb[1]
                    if stats.nonfinite_mb < 0 and not math.isfinite(stats_mb[0]):
                        stats.nonfinite_mb = a.mb
                    self._emulate(t0)
                    if train:
                        self.timers.fwd_s += time.perf_counter() - t0
                elif a.kind == sched.SEND_F:
                    out, mask = outputs[key]
                    sent = self._pack(out, ACT, a.peer, step, a.mb, train)
                    wire.send(a.peer, ACT, step, a.mb, [sent] if mask is None else [sent, mask])
                    if not (train and backward[a.stage]):
                        del outputs[key]  # no graph kept below the frontier
                elif a.kind == sched.RECV_B:
                    grads[key] = self._unpack(wire.recv(a.peer, GRAD, step, a.mb)[0])
                elif a.kind == sched.B:
                    t0 = time.perf_counter()
                    if key in losses:
                        losses.pop(key).backward()
                    else:
                        out, _ = outputs.pop(key)
                        torch.autograd.backward(out, grads.pop(key))
                    self._emulate(t0)
                    self.timers.bwd_s += time.perf_counter() - t0
                elif a.kind == sched.SEND_B:
                    wire.send(a.peer, GRAD, step, a.mb,
                              [self._pack(inputs.pop(key).grad, GRAD, a.peer, step, a.mb, train)])
            except PeerError as e:  # already names rank, peer and step: add the plan's action
                e.args = (f"{e} [plan action {a}: stage {a.stage} mb {a.mb}]",)
                raise
            except Exception as e:
                raise RuntimeError(f"[rank {rank} stage {a.stage} step {step} mb {a.mb} action {a}] {e}") from e
        if wire is not None and flush:
            wire.flush()
        if self.topo.holds_head:
            stats.count = total
        return stats

    def _pack(self, x: torch.Tensor, kind: int, peer: int, step: int, mb: int, train: bool) -> torch.Tensor:
        """What travels for hidden state or gradient ``x`` (pipeline.compress; else ``x`` itself)."""
        if self.smash is None or not (train or self.eval_codec):
            return x
        return self.smash.pack(x, kind == GRAD, (self.topo.rank, peer, kind, step, mb),
                               stream=(peer, mb) if train else None)

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.smash is None else SmashedCodec.unpack(t, self.device, base_dtype(self.cfg))

    def _emulate(self, started: float) -> None:
        """pipeline.emulate: stretch the compute that began at ``started`` to this rank's profile speed."""
        if self.slowdown:
            time.sleep((time.perf_counter() - started) * self.slowdown)

    def _blocks(self, lo, hi, hidden, ctx, plan, step, mb, grad, train):
        return run_blocks(self.cut, lo, hi, hidden, ctx, frontier=plan.frontier, grad=grad, training=train,
                          seed=self.cfg.run.seed, step=step, micro_batch=mb, dropout=self.cfg.adapter.dropout > 0)

    def _forward(self, stage, mb, key, step, train, grad, plan, micro, labels, total, inputs, masks, outputs,
                 losses):
        cut = self.cut
        ahead = self._ahead.pop((step, mb), None) if stage.has_embed and not grad else None
        if ahead is not None:  # pipeline.lookahead ran it during the last step's tail, up to block ahead.block
            hidden, mask, ctx, lo = ahead.hidden, ahead.mask, ahead.ctx, ahead.block
        else:
            if stage.has_embed:
                batch = micro[mb]
                with torch.no_grad():
                    hidden = cut.embed(batch.input_ids)
                if grad and not self.cfg.pipeline.early_stop:
                    hidden.requires_grad_(True)  # no early stop: backward runs down to the embedding output
                mask = batch.attention_mask
            else:
                hidden, mask = inputs[key], masks.pop(key)
                if not hidden.requires_grad:
                    del inputs[key]  # kept only while its gradient still has to be sent down
            with torch.no_grad():
                ctx = cut.context(hidden, mask)
            lo = stage.lo
        hidden = self._blocks(lo, stage.hi, hidden, ctx, plan, step, mb, grad, train)
        if not stage.has_head:
            outputs[key] = (hidden, mask)
            return 0.0, 0
        with torch.set_grad_enabled(grad):
            loss_total, correct = head_loss(cut, hidden, mask, labels[mb])
            loss = loss_total / total
        if grad:
            losses[key] = loss
        return loss.item(), correct

    # -- one global batch
    def train_step(self, step: int, frontier: int, batch: Batch | None, micro_batches: int,
                   ahead: Callable[[], Ahead | None] | None = None) -> dict:
        """Forward and backward of one global batch, then (when every rank's loss and gradient norm are finite)
        clipping and the optimizer step. Returns the loss, the global gradient norm and a non-finite report.
        ``ahead`` (the initiator, pipeline.lookahead): gives the next step, whose first stage this rank may run
        while it waits for the others to finish this one (:meth:`_lookahead`)."""
        cpu0, sent0 = time.process_time(), self.wire.counters.bytes_sent if self.wire else 0
        self.adapters.set_frontier(frontier)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        plan = self.plan(micro_batches, frontier, train=True)
        # pipeline.lookahead: the next step's first stage, run from this rank's last action until the step's sum
        # arrives. The sum travels in a group of its own (step_group), so the rank posts it with its last sends
        # still in flight; once it has arrived every rank has finished the step, so they were all taken.
        meanwhile = None if ahead is None else self._lookahead(plan, ahead, micro_batches)
        stats = self._run_batch(plan, step, True, batch, micro_batches, flush=meanwhile is None)
        grads = [p.grad for p in self.adapters.trainable() if p.grad is not None]
        local_sq = sum(float(g.double().pow(2).sum()) for g in grads)
        # every rank's verdict travels in the same all_reduce as the loss, so all ranks decide alike
        W, r = self.topo.world_size, self.topo.rank
        flags = [0.0] * (2 * W)
        flags[r] = stats.nonfinite_mb + 1.0
        flags[W + r] = float(not math.isfinite(local_sq))
        loss, count, correct, global_sq, *flags = self.all_reduce_sum(
            [stats.loss, stats.count, stats.correct, local_sq, *flags], step,
            "summing the step's loss and gradient norm", meanwhile=meanwhile, group=self.step_group)
        if meanwhile is not None and self.wire is not None:
            self.wire.flush()
        for key in [k for k in self._ahead if k[0] <= step]:
            del self._ahead[key]  # what this step did not use (its plan needed a graph there) is of no further use
        nonfinite = self._nonfinite(step, loss, global_sq, flags)
        t0 = time.perf_counter()
        if nonfinite:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)  # no update, no optimizer state touched
        else:
            if self.cfg.optim.grad_clip > 0:
                coef = clip_coefficient(global_sq, self.cfg.optim.grad_clip)
                for g in grads:
                    g.mul_(coef)
            if self.optimizer is not None:
                self.optimizer.step()
        self.timers.step_s += time.perf_counter() - t0
        self.timers.train_cpu_s += time.process_time() - cpu0
        self.timers.train_bytes_sent += (self.wire.counters.bytes_sent if self.wire else 0) - sent0
        return {"loss": loss, "grad_norm": math.sqrt(global_sq) if global_sq >= 0 else math.nan,
                "nonfinite": nonfinite}

    def _lookahead(self, plan: sched.Plan, ahead: Callable[[], Ahead | None], micro_batches: int
                   ) -> Iterator[int]:
        """Stage 0's forwards of the next step (``ahead()``, asked only once the wait has begun), a few blocks
        at a time (about a quarter of the stage); nothing where pipeline.lookahead does not apply.

        Note (lookahead). At the end of a step the first stage's rank waits: for the rank above it to take its
        last sends (line mode, where it holds no head), then for the ranks above it to finish their backward.
        When stage 0 holds no trainable adapter in this step nor in the next one, its output for the next step
        depends only on that step's batch and frozen weights that no optimizer step changes, so it can be
        computed now, exactly as the next step would compute it (same code, same dropout seeds, drawn per
        block). The rank posts the step's sum with its last sends still in flight (the sum has a group of its
        own; gloo tells a send is done only when it is waited on) and runs these forwards until the sum has
        come, which every rank posts only once it has received all its messages of the step: it takes only
        time it would have waited, and at most a quarter of a stage's forward past it. A micro-batch left half
        done is continued by the next step's forward from the block where it stopped; the next step starts its
        first sends at once, and the ranks above start their work that much earlier. Nothing is sent ahead:
        every message goes when the plan says, so the wire's order, evaluations and checkpoints between steps
        are untouched."""
        stage = plan.stages[0]
        if stage.rank != self.topo.rank or stage.has_head or plan.backward[0]:
            return
        nxt = ahead()
        if nxt is None:
            return
        next_plan = self.plan(micro_batches, nxt.frontier, train=True)
        if next_plan.backward[0]:
            return
        micro = [b.to(self.device) for b in nxt.batch.split(micro_batches)]
        chunk = -(-(stage.hi - stage.lo) // 4)
        for mb in range(micro_batches):
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    hidden = self.cut.embed(micro[mb].input_ids)
                    ctx = self.cut.context(hidden, micro[mb].attention_mask)
                part = self._ahead[(nxt.step, mb)] = AheadForward(hidden, micro[mb].attention_mask, ctx, stage.lo)
                while part.block < stage.hi:
                    hi = min(part.block + chunk, stage.hi)
                    part.hidden = self._blocks(part.block, hi, part.hidden, ctx, next_plan, nxt.step, mb, False,
                                               True)
                    part.block = hi
                    if self.device.type == "cuda":  # the work is done, not only queued, before the next check
                        torch.cuda.current_stream(self.device).synchronize()
                    self._emulate(t0)
                    self.timers.fwd_s += time.perf_counter() - t0
                    yield mb
                    t0 = time.perf_counter()
            except Exception as e:
                raise RuntimeError(f"[rank {self.topo.rank} stage 0 step {nxt.step} mb {mb}: running it ahead, "
                                   f"during step {nxt.step - 1}'s tail] {e}") from e
            self.timers.lookahead_mb += 1

    def _nonfinite(self, step: int, loss: float, global_sq: float, flags: list[float]) -> str | None:
        """Name the first rank and micro-batch with a non-finite loss or gradient norm, or None."""
        W = self.topo.world_size
        for r in range(W):
            if flags[r] > 0:
                return f"non-finite loss ({loss}) at step {step} micro-batch {int(flags[r]) - 1} on rank {r}"
        for r in range(W):
            if flags[W + r] > 0:
                lo, hi = block_ranges(self.topo.partition)[r]
                return f"non-finite gradient norm at step {step} on rank {r} (blocks {lo}..{hi - 1})"
        if not (math.isfinite(loss) and math.isfinite(global_sq)):
            return f"non-finite loss ({loss}) or gradient norm ({global_sq}) at step {step}"
        return None

    @torch.no_grad()
    def eval_batch(self, index: int, batch: Batch | None, micro_batches: int) -> StepStats:
        plan = self.plan(micro_batches, self.num_blocks, train=False)
        # Eval batches use negative step numbers: their headers never look like a training step's.
        return self._run_batch(plan, -1 - index, False, batch, micro_batches)

    def _run_batch(self, plan, step, train, batch, micro_batches, flush=True) -> StepStats:
        topo = self.topo
        micro = [b.to(self.device) for b in batch.split(micro_batches)] if topo.is_initiator else None
        labels, total = None, 0
        if topo.holds_head:
            if topo.is_initiator:
                all_labels = batch.labels
            else:  # line mode: the loss lives on the last rank, labels come from the initiator
                all_labels = self.wire.recv(0, LABELS, step, 0)[0]
            labels = [t.to(self.device) for t in torch.tensor_split(all_labels, micro_batches)]
            total = Batch(all_labels, all_labels).count()
        elif topo.is_initiator and topo.head_rank != 0:
            self.wire.send(topo.head_rank, LABELS, step, 0, [batch.labels])
        stats = self.execute(plan, step, train, micro, labels, total, flush)
        if not train:
            stats.loss *= total  # eval wants loss sums, not the scaled mean
        return stats

    # -- tensors to and from the initiator (adapters, checkpoints)
    def gather_tensors(self, tensors: dict[str, torch.Tensor], kind: int = CHECKPOINT
                       ) -> dict[str, torch.Tensor] | None:
        """Every rank's named tensors merged on the initiator (None elsewhere)."""
        state = {k: v.detach().clone() for k, v in tensors.items()}
        if self.topo.world_size == 1:
            return state
        if self.topo.is_initiator:
            for src in range(1, self.topo.world_size):
                state.update(unpack_state(self.wire.recv(src, kind, 0, 0)))
            self.wire.flush()
            return state
        self.wire.send(0, kind, 0, 0, pack_state(state))
        self.wire.flush()
        return None

    def scatter_tensors(self, tensors: dict[str, torch.Tensor] | None, keys) -> dict[str, torch.Tensor]:
        """From the initiator's checkpoint ``tensors``, the adapters named ``keys`` (those this rank holds now,
        whatever partition wrote them) with their AdamW state: each rank asks for its names and gets those."""
        keys = sorted(keys)
        if self.topo.world_size == 1:
            return checkpoint.select(tensors, keys)
        if self.topo.is_initiator:
            for dst in range(1, self.topo.world_size):
                wanted = decode_names(self.wire.recv(dst, CHECKPOINT, 1, 0)[0])
                self.wire.send(dst, CHECKPOINT, 2, 0, pack_state(checkpoint.select(tensors, wanted)))
            self.wire.flush()
            return checkpoint.select(tensors, keys)
        self.wire.send(0, CHECKPOINT, 1, 0, [encode_names(keys)])
        mine = unpack_state(self.wire.recv(0, CHECKPOINT, 2, 0))
        self.wire.flush()
        return mine

    def rank_summary(self) -> list[dict]:
        """Every rank's timers and counters, gathered on every rank."""
        lo, hi = self.topo.blocks
        return gather_rank_rows(self.topo.world_size, {"rank": self.topo.rank, "blocks": [lo, hi],
                                                       "fwd_s": self.timers.fwd_s, "bwd_s": self.timers.bwd_s,
                                                       "step_s": self.timers.step_s,
                                                       "train_cpu_s": self.timers.train_cpu_s,
                                                       "train_bytes_sent": self.timers.train_bytes_sent,
                                                       "lookahead_mb": self.timers.lookahead_mb},
                                self.wire.counters if self.wire else Counters())

    def write_message_log(self, out: Path) -> None:
        """run.message_log: every message this rank sent, as [kind, dst, step, micro_batch] rows."""
        if self.wire is not None:
            out.mkdir(parents=True, exist_ok=True)
            rows = [[KIND_NAMES[k], dst, step, mb] for k, dst, step, mb in self.wire.sent_log]
            (out / f"rank{self.topo.rank}.json").write_text(json.dumps(rows))


def base_dtype(cfg: Config) -> torch.dtype:
    """run.dtype of the frozen base."""
    return torch.bfloat16 if cfg.run.dtype == "bfloat16" else torch.float32


def emulated_slowdown(speed: float) -> float:
    """Extra sleep per second of real compute for a rank of relative ``speed`` (this machine = 1; a faster
    device cannot be emulated, so speeds above 1 count as 1)."""
    if speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    return max(0.0, 1.0 / speed - 1.0)


def rank_row(own: dict, counters: Counters) -> torch.Tensor:
    """One rank's row as a float64 tensor (no objects on the wire): ``own`` (numbers, and ``blocks`` [lo, hi])
    plus wait time, bytes and messages per direction and kind, peak RSS, and the process's CPU time so far (all
    threads, gloo's included: beside ``fwd_s`` + ``bwd_s`` it shows how much CPU the rank spent outside
    compute)."""
    kinds = list(KIND_NAMES.values())
    scalars = [v for k, v in own.items() if k != "blocks"] + list(own["blocks"]) + [
        counters.wait_s, counters.bytes_sent, counters.bytes_recv, peak_rss_bytes(), time.process_time(),
        counters.messages_sent, counters.messages_recv]
    per_kind = [v for table in (counters.sent_by_kind, counters.recv_by_kind) for k in kinds
                for v in table.get(k, [0, 0])]
    return torch.tensor(scalars + per_kind, dtype=torch.float64)


def decode_row(row: torch.Tensor, own_keys: list[str]) -> dict:
    """The dict of :func:`rank_row` (``own_keys``: the keys of ``own``, in order)."""
    kinds = list(KIND_NAMES.values())
    names = [k for k in own_keys if k != "blocks"] + ["lo", "hi", "wait_s", "bytes_sent", "bytes_recv",
                                                       "peak_rss_bytes", "cpu_s", "messages_sent", "messages_recv"]
    values = row.tolist()
    d = {k: (v if k.endswith("_s") else int(v)) for k, v in zip(names, values)}
    d["blocks"] = [d.pop("lo"), d.pop("hi")]
    tail = [int(v) for v in values[len(names):]]
    for i, direction in enumerate(("sent", "recv")):
        d[f"{direction}_by_kind"] = {k: {"messages": tail[(i * len(kinds) + j) * 2],
                                         "bytes": tail[(i * len(kinds) + j) * 2 + 1]} for j, k in enumerate(kinds)}
    return d


def gather_rank_rows(world_size: int, own: dict, counters: Counters) -> list[dict]:
    """All ranks' rows (:func:`rank_row`), gathered on every rank with one all_gather."""
    mine = rank_row(own, counters)
    rows = [mine]
    if world_size > 1:
        rows = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(rows, mine)
    return [decode_row(row, list(own)) for row in rows]


class PipelineJob:
    """A pipeline run on this rank before its process group exists: the topology and (initiator) the data,
    every user mistake already checked."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        # A capacity or fastest plan is measured on the initiator once the group exists, then agreed on (see build).
        self.planned = cfg.pipeline.partition in PLANNED and cfg.pipeline.mode != "single"
        self.cfg = cfg
        self.topo = make_topology(cfg, rank, world_size, partition=[0] * world_size if self.planned else None)
        check_target_modules(cfg.adapter, cfg.model.path, cfg.model.task)
        self.is_lead = self.topo.is_initiator  # it owns the data
        self.data = load_run_data(cfg, read_config(cfg.model.path).vocab_size) if self.is_lead else None
        # what this box's out_dir holds (only the initiator writes checkpoints; see build)
        newest = checkpoint.latest(cfg.run.out_dir)
        self.newest_here = newest[1]["step"] if newest else -1

    def build(self, refusal: ConfigError | None, resume_step: int, place: Placement = Placement()
              ) -> PipelineTrainer:
        """Collective: agree on the lead's resume decision (and a capacity or fastest plan), then load this rank's
        slice."""
        cfg, topo = self.cfg, self.topo
        if topo.world_size == 1:
            if refusal is not None:
                raise refusal
            return PipelineTrainer(cfg, topo, place, self.data)
        # every rank takes part in both collectives, whatever the initiator decided
        plan = [-1] * topo.world_size
        if topo.is_initiator and refusal is None:
            try:
                plan = _planned_partition(cfg, topo.world_size) if self.planned else list(topo.partition)
            except ValueError as e:
                refusal = ConfigError(str(e))
        t = torch.tensor(plan, dtype=torch.int64)
        with collective(topo.rank, "agreeing on the partition and the resume point", 0, cfg.run.timeout_s):
            dist.broadcast(t, src=0)
        if refusal is not None:
            raise refusal
        if int(t[0]) < 0:
            raise ConfigError("rank 0 refused to start (a resume that does not fit, or no partition plan); its log "
                              "names the setting")
        if self.planned:
            self.topo = topo = make_topology(cfg, topo.rank, topo.world_size, partition=t.tolist())
        if cfg.run.resume is not False:
            # Note: torchrun's c10d rendezvous may hand rank 0 to another box after a restart that changed the
            # boxes; a newer checkpoint on a box that is no longer rank 0 must not be silently ignored.
            t = torch.tensor([resume_step if topo.is_initiator else -1, self.newest_here], dtype=torch.int64)
            with collective(topo.rank, "comparing the boxes' checkpoints", 0, cfg.run.timeout_s):
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            lead_step, newest = t.tolist()
            if newest > lead_step:
                raise ConfigError(f"run.resume: another box holds a checkpoint after step {newest} in {cfg.run.out_dir}"
                                  f", but rank 0 (which reads and writes checkpoints) "
                                  f"{'found none' if lead_step < 0 else f'continues after step {lead_step}'}; give "
                                  "every box the same run.out_dir (a shared filesystem) or copy its checkpoints/ "
                                  "to rank 0's box, or set run.resume=false to start over")
        return PipelineTrainer(cfg, topo, place, self.data)


def _planned_partition(cfg: Config, world_size: int, log_it: bool = True) -> list[int]:
    """pipeline.partition capacity or fastest, from costs measured here (rank 0's plan, which the others take)."""
    if cfg.pipeline.partition == "fastest":
        plan, details = plan_fastest(cfg, world_size)
        if log_it:
            log.info("fastest partition %s: predicted training %.1f s, against %.1f s for %s (%d splits simulated)",
                     plan, details["predicted_s"], details["start_s"], details["start"], details["searched"])
        return plan
    plan, details = plan_capacity(cfg, world_size)
    if log_it:
        log.info("capacity partition %s: max blocks per rank %s, stage seconds %s", plan, details["max_blocks"],
                 [round(t, 3) for t in details["stage_s"]])
    return plan


class PipelineTrainer(Trainer):
    """single, ring and line under the shared driver: a unit is one optimizer step. The initiator owns the
    data and the unfreezing schedule and broadcasts each step's frontier; every rank then runs the same plan."""

    def __init__(self, cfg: Config, topo: Topology, place: Placement, data):
        self.cfg, self.topo, self.data = cfg, topo, data
        self.rt = rt = PipelineRuntime(cfg, topo, place)
        self.is_lead, self.mode, self.world_size = topo.is_initiator, topo.mode, topo.world_size
        self.steps_per_unit, self.checkpoint_every = 1, cfg.run.checkpoint_every
        self.adapter_config = rt.adapters.config_json
        self.unfreezer = Unfreezer(cfg.unfreeze, rt.num_blocks)
        self.last_losses: list[float] = []  # the plateau signal gathered since the last unfreezing check
        lead, M = self.is_lead, cfg.data.micro_batches
        # Eval batch sizes are only known to the initiator; every rank needs them to build the same plans.
        self.eval_batches = data.eval.eval_batches(cfg.data.batch_size, cfg.run.eval_batches) \
            if lead and data.eval else []
        n_eval = rt.broadcast_ints([len(self.eval_batches)] if lead else None, 1, step=0)[0]
        self.eval_micro = rt.broadcast_ints([min(M, b.size) for b in self.eval_batches] if lead else None, n_eval,
                                            step=0) if n_eval else []
        self.has_eval = n_eval > 0
        if lead:
            log.info("%s: %d ranks, blocks per rank %s, schedule %s, %d micro-batches", topo.mode, topo.world_size,
                     topo.partition, cfg.pipeline.schedule, M)

    def start(self, resume) -> int | None:
        rt = self.rt
        step = rt.broadcast_ints([resume[0] if resume else -1] if self.is_lead else None, 1, step=0)[0]
        if step < 0:
            return None
        tensors = None
        if self.is_lead:
            _, tensors, state = resume
            plateau = state["unfreezer"]
            self.unfreezer.plateaus, self.unfreezer.stale = plateau["plateaus"], plateau["stale"]
            self.unfreezer.best = math.inf if plateau["best"] is None else plateau["best"]
            self.last_losses = list(state["last_losses"])
        mine = rt.scatter_tensors(tensors, [p.key for p in rt.adapters.params])
        checkpoint.load_adapter_tensors(mine, rt.adapters, rt.optimizer)
        return step

    def evaluate(self) -> dict:
        loss, count, correct = 0.0, 0, 0
        for j in range(len(self.eval_micro)):
            s = self.rt.eval_batch(j, self.eval_batches[j] if self.is_lead else None, self.eval_micro[j])
            loss, count, correct = loss + s.loss, count + s.count, correct + s.correct
        loss, count, correct = self.rt.all_reduce_sum([loss, count, correct], step=-1, action="summing eval losses")
        return eval_record(loss, int(count), int(correct), self.cfg.model.task)

    def train_unit(self, step: int) -> UnitResult:
        cfg, rt, lead, L = self.cfg, self.rt, self.is_lead, self.rt.num_blocks
        epoch, batch = self.data.train.batch_at(step, cfg.data.batch_size, cfg.data.shuffle, cfg.run.seed) \
            if lead else (0, None)
        trainable = self.unfreezer.trainable(step, epoch) if lead else 0
        epoch, trainable = rt.broadcast_ints([epoch, trainable] if lead else None, 2, step=step)
        result = rt.train_step(step, L - trainable, batch, cfg.data.micro_batches,
                               ahead=(lambda: self.next_step(step)) if lead else None)
        loss, nonfinite = result["loss"], result["nonfinite"]
        if not nonfinite:
            self.last_losses.append(loss)
        stopping = nonfinite is not None and cfg.optim.on_nonfinite == "stop"  # (a checkpoint of the state before)
        evaluated = None
        if cfg.unfreeze.by == "plateau" and cfg.unfreeze.every and (step + 1) % cfg.unfreeze.every == 0 \
                and not stopping:
            evaluated = self.evaluate() if self.has_eval else None
            signal = evaluated["eval_loss"] if evaluated else sum(self.last_losses) / max(len(self.last_losses), 1)
            self.unfreezer.observe(signal)
            self.last_losses = []
        if not lead:
            return UnitResult(nonfinite=nonfinite, evaluated=evaluated)
        record = {"step": step, "loss": None if nonfinite else loss, "trainable_blocks": trainable,
                  "frontier": L - trainable, "epoch": epoch,
                  "grad_norm": None if nonfinite else result["grad_norm"],
                  "note": f"trainable {trainable}/{L} frontier {L - trainable}"}
        if nonfinite:
            record.update({"skipped": True, "nonfinite": nonfinite})
        return UnitResult(records=[record], tokens=input_tokens(batch), loss=None if nonfinite else loss,
                          nonfinite=nonfinite, evaluated=evaluated)

    def next_step(self, step: int) -> Ahead | None:
        """Step ``step + 1`` as the initiator will run it, where that is known now (pipeline.lookahead): not
        after the last step, nor where a plateau check after this step may move the frontier."""
        cfg, nxt = self.cfg, step + 1
        if not cfg.pipeline.lookahead or self.world_size == 1 or nxt >= cfg.run.steps:
            return None
        if cfg.unfreeze.by == "plateau" and cfg.unfreeze.every and nxt % cfg.unfreeze.every == 0:
            return None
        epoch, batch = self.data.train.batch_at(nxt, cfg.data.batch_size, cfg.data.shuffle, cfg.run.seed)
        return Ahead(nxt, self.rt.num_blocks - self.unfreezer.trainable(nxt, epoch), batch)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        rt = self.rt
        tensors = rt.gather_tensors(checkpoint.adapter_tensors(rt.adapters, rt.optimizer))
        best = None if math.isinf(self.unfreezer.best) else self.unfreezer.best
        return tensors, {"partition": list(self.topo.partition),
                         "unfreezer": {"plateaus": self.unfreezer.plateaus, "best": best,
                                       "stale": self.unfreezer.stale},
                         "last_losses": self.last_losses if self.cfg.unfreeze.by == "plateau" else []}

    def adapters(self) -> dict[str, torch.Tensor]:
        return self.rt.gather_tensors(self.rt.adapters.state_dict(), kind=ADAPTERS)

    def finish(self) -> dict:
        rt, cfg = self.rt, self.cfg
        if cfg.run.message_log:
            rt.write_message_log(Path(cfg.run.out_dir) / "messages")
        ranks = rt.rank_summary()
        if self.is_lead:
            for r in ranks:
                log.info("rank %d blocks %s: fwd %.2fs bwd %.2fs wait %.2fs step %.2fs sent %s recv %s peak RSS "
                         "%.0f MiB", r["rank"], r["blocks"], r["fwd_s"], r["bwd_s"], r["wait_s"], r["step_s"],
                         r["bytes_sent"], r["bytes_recv"], r["peak_rss_bytes"] / 2**20)
        return {"num_blocks": rt.num_blocks, "partition": self.topo.partition, "schedule": cfg.pipeline.schedule,
                "micro_batches": cfg.data.micro_batches, "ranks": ranks,
                **({"compress": dataclasses.asdict(cfg.compress)} if cfg.pipeline.compress else {})}


def evaluate_adapter(cfg: Config, adapter_dir: str | Path) -> dict:
    """Eval loss (perplexity / accuracy) of a saved adapter (peft format, e.g. a run's ``adapter/`` or
    ``rounds/round_NNNN/``) on data.eval's first run.eval_batches batches, in this one process."""
    from dataclasses import replace

    from .adapters import load_adapter_file
    from .train import load_split

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ConfigError(f"--adapter: got {str(adapter_dir)!r}; expected a directory with adapter_model.safetensors "
                          "(a run's out_dir/adapter)")
    if cfg.run.eval_batches < 1:
        raise ConfigError(f"run.eval_batches: got {cfg.run.eval_batches}; evaluating needs >= 1")
    cfg = replace(cfg, pipeline=replace(cfg.pipeline, mode="single", partition="even", profile=None, emulate=False))
    topo = make_topology(cfg, 0, 1)
    check_target_modules(cfg.adapter, cfg.model.path, cfg.model.task)
    if not cfg.data.eval:
        raise ConfigError("data.eval: got null; set the data to evaluate on (shakespeare, polarity, a .txt or a "
                          ".jsonl file)")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    eval_set = load_split(cfg, "eval", read_config(cfg.model.path).vocab_size)
    rt = PipelineRuntime(cfg, topo)
    state = load_adapter_file(adapter_dir)
    mine = rt.adapters.state_dict()
    missing, extra = sorted(mine.keys() - state.keys()), sorted(state.keys() - mine.keys())
    wrong = [k for k in mine.keys() & state.keys() if mine[k].shape != state[k].shape]
    if missing or extra or wrong:
        example = (wrong or missing or extra)[0]
        raise ConfigError(f"--adapter: {adapter_dir} does not fit adapter.kind={cfg.adapter.kind!r} r={cfg.adapter.r} "
                          f"target_modules={cfg.adapter.target_modules}: {len(missing)} tensors missing, "
                          f"{len(extra)} unexpected, {len(wrong)} of another shape (e.g. {example}); use the "
                          "adapter settings of the run that wrote it (its config.yaml)")
    rt.adapters.load_state_dict(state)
    loss, count, correct = 0.0, 0, 0
    for j, batch in enumerate(eval_set.eval_batches(cfg.data.batch_size, cfg.run.eval_batches)):
        s = rt.eval_batch(j, batch, min(cfg.data.micro_batches, batch.size))
        loss, count, correct = loss + s.loss, count + s.count, correct + s.correct
    return eval_record(loss, count, correct, cfg.model.task)
