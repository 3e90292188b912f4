"""Executes pipeline plans. One runtime serves `single` (one stage), `ring` and `line`.

Every rank runs the same loop: rank 0 (the initiator) owns the data and decides each step's frontier, which it
broadcasts as a small int64 tensor; then every rank builds the same plan (``schedule.build_schedule``) and executes
its own action list literally. Only the stages of a rank that the plan marks as doing backward build autograd
graphs; a rank wholly below the frontier runs forward under ``no_grad`` and its plan holds no gradient messages.

Per-step scalars (loss sum, counted targets, correct predictions, squared gradient norm) are summed with one
all_reduce of a float64 tensor, so the head's loss reaches rank 0 in line mode and clipping uses the global norm.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from . import config as config_mod
from . import schedule as sched
from .adapters import add_adapters, check_target_modules, save_adapters
from .comm import ACT, ADAPTERS, GRAD, KIND_NAMES, LABELS, Counters, Wire, pack_state, unpack_state
from .config import Config, ConfigError
from .data import Batch
from .models import load_model, num_blocks_of, read_config, resolve_model_dir
from .partition import block_ranges, check_memory, even_partition, head_cost_in_blocks, plan_capacity
from .train import (RunRecorder, Unfreezer, clip_coefficient, correct_count, eval_record, input_tokens,
                    load_run_data, loss_sum, make_optimizer, peak_rss_bytes, progress, run_blocks)

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


def world_from_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def make_topology(cfg: Config, rank: int, world_size: int, partition: list[int] | None = None) -> Topology:
    """Who holds what; ``partition`` overrides pipeline.partition (a capacity plan agreed on at start-up)."""
    mode = cfg.pipeline.mode
    assert mode in ("single", "ring", "line"), f"the pipeline runtime does not run mode {mode}"
    if mode in ("ring", "line") and world_size < 2:
        raise ConfigError(f"pipeline.mode: got {mode!r} with WORLD_SIZE={world_size}; run it under torchrun with "
                          f">= 2 ranks (torchrun --nproc-per-node 4 -m ringada train ...), or use mode single")
    num_blocks = num_blocks_of(cfg.model.path)
    config_mod.check_against_model(cfg, num_blocks, world_size)
    part = cfg.pipeline.partition
    if partition is None:
        if mode == "single":
            partition = [num_blocks]
        elif part == "even":
            partition = even_partition(num_blocks, world_size, mode,
                                       head_cost_in_blocks(cfg.model.path, cfg.model.task, cfg.model.num_labels))
        elif part == "capacity":
            try:
                partition, details = plan_capacity(cfg, world_size)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if rank == 0:
                log.info("capacity partition %s: max blocks per rank %s, stage seconds %s", partition,
                         details["max_blocks"], [round(t, 3) for t in details["stage_s"]])
        else:
            partition = list(part)
    if cfg.pipeline.profile and part != "capacity" and mode != "single":
        try:
            check_memory(cfg, partition)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return Topology(mode=mode, rank=rank, world_size=world_size, partition=partition,
                    stages=sched.build_stages("ring" if mode == "ring" else "line", partition))


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


@dataclass
class StepStats:
    loss: float = 0.0  # sum of this rank's scaled micro-batch losses (train) or loss sums (eval)
    count: int = 0
    correct: int = 0


class PipelineRuntime:
    """One rank's slice of the model, its adapters and optimizer, and the executor of plans."""

    def __init__(self, cfg: Config, topo: Topology, device: torch.device):
        self.cfg, self.topo, self.device = cfg, topo, device
        self.model_dir = str(resolve_model_dir(cfg.model.path))
        self.cut = load_model(cfg.model.path, cfg.model.task, cfg.model.num_labels, blocks=topo.blocks,
                              embed=topo.holds_embed, head=topo.holds_head, seed=cfg.run.seed)
        self.cut.model.to(device)
        self.adapters = add_adapters(self.cut, cfg.adapter, cfg.run.seed, base_dir=self.model_dir)
        self.optimizer = make_optimizer(cfg, self.adapters)
        self.num_blocks = self.cut.num_blocks
        # A classification head always trains; the frontier alone decides for a causal LM.
        self.head_trainable = cfg.model.task == "classification"
        self.slowdown, link_delay = 0.0, None
        if cfg.pipeline.emulate:
            from .profiles import load_profile

            profile = load_profile(cfg.pipeline.profile)
            self.slowdown = emulated_slowdown(profile.speed(profile.devices[topo.rank].gflops))
            link_delay = profile.link_seconds
        self.wire = Wire(topo.rank, topo.world_size, device, log_messages=cfg.run.message_log,
                         link_delay=link_delay) if topo.world_size > 1 else None
        self.timers = RankTimers()
        self._plans: dict[tuple, sched.Plan] = {}

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
                                                    frontier, head_trainable, self.cfg.pipeline.schedule)
        return self._plans[key]

    # -- control plane
    def broadcast_ints(self, values: list[int] | None, length: int) -> list[int]:
        """Rank 0's ``values`` on every rank (a tensor broadcast; identity in one process)."""
        if self.topo.world_size == 1:
            return list(values)
        t = torch.tensor(values if values is not None else [0] * length, dtype=torch.int64)
        dist.broadcast(t, src=0)
        return t.tolist()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.topo.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    # -- the executor
    def execute(self, plan: sched.Plan, step: int, train: bool, micro: list[Batch] | None,
                labels: list[torch.Tensor] | None, total: int) -> StepStats:
        """Run this rank's action list for one global batch. ``micro`` (the initiator) are the micro-batches;
        ``labels`` (the head holder) their labels; ``total`` the targets counted in the whole batch."""
        rank, wire, stages, backward = self.topo.rank, self.wire, plan.stages, plan.backward
        actions = plan.actions[rank]
        for a in actions:  # post receives early (headers), wait late
            if a.kind in (sched.RECV_F, sched.RECV_B):
                wire.expect(a.peer, ACT if a.kind == sched.RECV_F else GRAD, step, a.mb)
        inputs, outputs, masks, grads, losses = {}, {}, {}, {}, {}
        stats = StepStats()
        for a in actions:
            key = (a.stage, a.mb)
            try:
                if a.kind == sched.RECV_F:
                    tensors = wire.recv(a.peer, ACT, step, a.mb)
                    hidden = tensors[0]
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
                    self._emulate(t0)
                    if train:
                        self.timers.fwd_s += time.perf_counter() - t0
                elif a.kind == sched.SEND_F:
                    out, mask = outputs[key]
                    wire.send(a.peer, ACT, step, a.mb, [out] if mask is None else [out, mask])
                    if not (train and backward[a.stage]):
                        del outputs[key]  # no graph kept below the frontier
                elif a.kind == sched.RECV_B:
                    grads[key] = wire.recv(a.peer, GRAD, step, a.mb)[0]
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
                    wire.send(a.peer, GRAD, step, a.mb, [inputs.pop(key).grad])
            except Exception as e:
                raise RuntimeError(f"[rank {rank} stage {a.stage} step {step} mb {a.mb} action {a}] {e}") from e
        if wire is not None:
            wire.flush()
        if self.topo.holds_head:
            stats.count = total
        return stats

    def _emulate(self, started: float) -> None:
        """pipeline.emulate: stretch the compute that began at ``started`` to this rank's profile speed."""
        if self.slowdown:
            time.sleep((time.perf_counter() - started) * self.slowdown)

    def _forward(self, stage, mb, key, step, train, grad, plan, micro, labels, total, inputs, masks, outputs,
                 losses):
        cut = self.cut
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
        hidden = run_blocks(cut, stage.lo, stage.hi, hidden, ctx, frontier=plan.frontier, grad=grad,
                            training=train, seed=self.cfg.run.seed, step=step, micro_batch=mb,
                            dropout=self.cfg.adapter.dropout > 0)
        if not stage.has_head:
            outputs[key] = (hidden, mask)
            return 0.0, 0
        with torch.set_grad_enabled(grad):
            logits = cut.head(hidden, mask)
            loss = loss_sum(logits, labels[mb]) / total
        if grad:
            losses[key] = loss
        return loss.item(), correct_count(logits.detach(), labels[mb])

    # -- one global batch
    def train_step(self, step: int, frontier: int, batch: Batch | None, micro_batches: int) -> dict:
        cpu0, sent0 = time.process_time(), self.wire.counters.bytes_sent if self.wire else 0
        self.adapters.set_frontier(frontier)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        plan = self.plan(micro_batches, frontier, train=True)
        stats = self._run_batch(plan, step, True, batch, micro_batches)
        grads = [p.grad for p in self.adapters.trainable() if p.grad is not None]
        local_sq = sum(float(g.double().pow(2).sum()) for g in grads)
        loss, count, correct, global_sq = self.all_reduce_sum([stats.loss, stats.count, stats.correct, local_sq])
        t0 = time.perf_counter()
        if self.cfg.optim.grad_clip > 0:
            coef = clip_coefficient(global_sq, self.cfg.optim.grad_clip)
            for g in grads:
                g.mul_(coef)
        if self.optimizer is not None:
            self.optimizer.step()
        self.timers.step_s += time.perf_counter() - t0
        self.timers.train_cpu_s += time.process_time() - cpu0
        self.timers.train_bytes_sent += (self.wire.counters.bytes_sent if self.wire else 0) - sent0
        return {"loss": loss, "grad_norm": math.sqrt(global_sq)}

    @torch.no_grad()
    def eval_batch(self, index: int, batch: Batch | None, micro_batches: int) -> StepStats:
        plan = self.plan(micro_batches, self.num_blocks, train=False)
        # Eval batches use negative step numbers so their tags never meet a training step's.
        return self._run_batch(plan, -1 - index, False, batch, micro_batches)

    def _run_batch(self, plan, step, train, batch, micro_batches) -> StepStats:
        topo = self.topo
        micro = [self._to_device(b) for b in batch.split(micro_batches)] if topo.is_initiator else None
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
        stats = self.execute(plan, step, train, micro, labels, total)
        if not train:
            stats.loss *= total  # eval wants loss sums, not the scaled mean
        return stats

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        mask = batch.attention_mask.to(self.device) if batch.attention_mask is not None else None
        return Batch(batch.input_ids.to(self.device), batch.labels.to(self.device), mask)

    # -- adapters to the initiator
    def gather_adapters(self, tag_step: int) -> dict[str, torch.Tensor] | None:
        state = self.adapters.state_dict()
        if self.topo.world_size == 1:
            return state
        if self.topo.is_initiator:
            for src in range(1, self.topo.world_size):
                state.update(unpack_state(self.wire.recv(src, ADAPTERS, tag_step, 0)))
            self.wire.flush()
            return state
        self.wire.send(0, ADAPTERS, tag_step, 0, pack_state(state))
        self.wire.flush()
        return None

    def rank_summary(self) -> list[dict]:
        """Every rank's timers and counters, gathered on every rank."""
        lo, hi = self.topo.blocks
        return gather_rank_rows(self.topo.world_size, {"rank": self.topo.rank, "blocks": [lo, hi],
                                                       "fwd_s": self.timers.fwd_s, "bwd_s": self.timers.bwd_s,
                                                       "step_s": self.timers.step_s,
                                                       "train_cpu_s": self.timers.train_cpu_s,
                                                       "train_bytes_sent": self.timers.train_bytes_sent},
                                self.wire.counters if self.wire else Counters())

    def write_message_log(self, out: Path) -> None:
        """run.message_log: every message this rank sent, as [kind, dst, step, micro_batch] rows."""
        if self.wire is not None:
            out.mkdir(parents=True, exist_ok=True)
            rows = [[KIND_NAMES[k], dst, step, mb] for k, dst, step, mb in self.wire.sent_log]
            (out / f"rank{self.topo.rank}.json").write_text(json.dumps(rows))


def emulated_slowdown(speed: float) -> float:
    """Extra sleep per second of real compute for a rank of relative ``speed`` (this machine = 1; a faster
    device cannot be emulated, so speeds above 1 count as 1)."""
    if speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    return max(0.0, 1.0 / speed - 1.0)


def gather_rank_rows(world_size: int, own: dict, counters: Counters) -> list[dict]:
    """All ranks' rows (a float64 tensor all_gather, no objects): ``own`` (numbers, and ``blocks`` [lo, hi]) plus
    wait time, bytes and messages per direction and kind, peak RSS, and the process's CPU time so far (all threads,
    gloo's included: beside ``fwd_s`` + ``bwd_s`` it shows how much CPU the rank spent outside compute)."""
    kinds = list(KIND_NAMES.values())
    scalars = {**{k: v for k, v in own.items() if k != "blocks"}, "lo": own["blocks"][0], "hi": own["blocks"][1],
               "wait_s": counters.wait_s, "bytes_sent": counters.bytes_sent, "bytes_recv": counters.bytes_recv,
               "peak_rss_bytes": peak_rss_bytes(), "cpu_s": time.process_time(), "messages_sent": counters.messages_sent,
               "messages_recv": counters.messages_recv}
    per_kind = [v for table in (counters.sent_by_kind, counters.recv_by_kind) for k in kinds
                for v in table.get(k, [0, 0])]
    mine = torch.tensor(list(scalars.values()) + per_kind, dtype=torch.float64)
    rows = [mine]
    if world_size > 1:
        rows = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(rows, mine)
    result = []
    for row in rows:
        values = row.tolist()
        d = {k: (v if k.endswith("_s") else int(v)) for k, v in zip(scalars, values)}
        d["blocks"] = [d.pop("lo"), d.pop("hi")]
        tail = [int(v) for v in values[len(scalars):]]
        for i, direction in enumerate(("sent", "recv")):
            d[f"{direction}_by_kind"] = {k: {"messages": tail[(i * len(kinds) + j) * 2],
                                             "bytes": tail[(i * len(kinds) + j) * 2 + 1]}
                                         for j, k in enumerate(kinds)}
        result.append(d)
    return result


# ------------------------------------------------------------------------------------------------- the driver


def _init_distributed(topo: Topology) -> torch.device:
    """gloo on CPU tensors. (The wire relies on P2P tags and pre-posted receives, which NCCL does not honour;
    GPU placement is not supported in this version.)"""
    if topo.world_size == 1:
        return torch.device("cpu")
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"):
        # One box: keep gloo's listening sockets on loopback unless the user chose an interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend="gloo")
    return torch.device("cpu")


def train(cfg: Config) -> dict | None:
    """Train with the world torchrun gave us (or one process). Returns the summary on rank 0.

    Everything a user can get wrong is checked before the process group starts: the config, the partition, the
    LoRA target names and (on the initiator, which owns the data) the data. A capacity partition is the one
    exception in part: rank 0 measures and plans it, then broadcasts it, so all ranks (on any machine) agree.
    """
    rank, world_size = world_from_env()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    capacity = cfg.pipeline.partition == "capacity" and cfg.pipeline.mode != "single"
    topo = make_topology(cfg, rank, world_size, partition=[0] * world_size if capacity else None)
    check_target_modules(cfg.adapter, cfg.model.path, cfg.model.task)
    data = load_run_data(cfg, read_config(cfg.model.path).vocab_size) if rank == 0 else None
    torch.manual_seed(cfg.run.seed)
    # a resume point is checked by every rank before the first collective (a capacity plan: once it is agreed);
    # a fresh run clears an earlier run's checkpoints so that a later resume can only continue this one
    resume = checkpoint.find_resume_point(cfg, world_size, topo.partition) if cfg.run.resume and not capacity \
        else None
    if not cfg.run.resume and rank == 0:
        checkpoint.clear(cfg.run.out_dir)
    device = _init_distributed(topo)
    try:
        if capacity:
            topo = make_topology(cfg, rank, world_size, partition=_agree_on_capacity(cfg, rank, world_size))
            if cfg.run.resume:
                resume = checkpoint.find_resume_point(cfg, world_size, topo.partition)
        return _train(cfg, topo, device, data, resume)
    finally:
        if topo.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _agree_on_capacity(cfg: Config, rank: int, world_size: int) -> list[int]:
    plan = [-1] * world_size
    error = None
    if rank == 0:
        try:
            plan, details = plan_capacity(cfg, world_size)
            log.info("capacity partition %s: max blocks per rank %s, stage seconds %s", plan, details["max_blocks"],
                     [round(t, 3) for t in details["stage_s"]])
        except ValueError as e:
            error = e
    t = torch.tensor(plan, dtype=torch.int64)
    dist.broadcast(t, src=0)
    if error is not None:
        raise ConfigError(str(error))
    if int(t[0]) < 0:
        raise ConfigError("pipeline.partition: rank 0 could not plan a capacity partition (see its error)")
    return t.tolist()


def _train(cfg: Config, topo: Topology, device: torch.device, data, resume: tuple[Path, dict] | None = None
           ) -> dict | None:
    rt = PipelineRuntime(cfg, topo, device)
    L, M = rt.num_blocks, cfg.data.micro_batches
    lead = topo.is_initiator
    start = resume[1]["step"] if resume else 0
    if cfg.run.resume:  # every rank must continue from the same step (out_dir seen alike by all of them)
        agreed = rt.broadcast_ints([start] if lead else None, 1)[0]
        if rt.all_reduce_sum([float(agreed != start)])[0]:
            raise ConfigError(f"run.resume: the ranks found different checkpoints (rank 0: after step {agreed}); "
                              "run.out_dir must be the same directory for every rank (a shared filesystem)")
    if lead:
        log.info("%s: %d ranks, blocks per rank %s, schedule %s, %d micro-batches%s", topo.mode, topo.world_size,
                 topo.partition, cfg.pipeline.schedule, M, f"; resuming after step {start}" if resume else "")
    recorder = RunRecorder(cfg, enabled=lead, keep_steps=start if resume else None)
    out = Path(cfg.run.out_dir)
    init_state = rt.gather_adapters(tag_step=0)
    if lead:
        save_adapters(out / "adapter_init", init_state, rt.adapters.config_json)
    if resume:
        checkpoint.load_rank(resume[0], topo.rank, rt.adapters, rt.optimizer)

    # Eval batch sizes are only known to the initiator; every rank needs them to build the same plans.
    eval_batches = data.eval.eval_batches(cfg.data.batch_size, cfg.run.eval_batches) if lead and data.eval else []
    n_eval = rt.broadcast_ints([len(eval_batches)] if lead else None, 1)[0]
    eval_micro = rt.broadcast_ints([min(M, b.size) for b in eval_batches] if lead else None, n_eval) if n_eval else []

    def evaluate() -> dict:
        loss, count, correct = 0.0, 0, 0
        for j in range(n_eval):
            s = rt.eval_batch(j, eval_batches[j] if lead else None, eval_micro[j])
            loss, count, correct = loss + s.loss, count + s.count, correct + s.correct
        loss, count, correct = rt.all_reduce_sum([loss, count, correct])
        return eval_record(loss, int(count), int(correct), cfg.model.task)

    unfreezer = Unfreezer(cfg.unfreeze, L)
    tokens_total, train_s, loss, last_losses = 0, 0.0, float("nan"), []
    if resume:
        state = resume[1]
        before, tokens_total, train_s, last_losses, loss = (state["eval_before"], state["tokens"],
                                                            state["train_s"], state["last_losses"], state["loss"])
        plateau = state["unfreezer"]
        unfreezer.plateaus, unfreezer.stale = plateau["plateaus"], plateau["stale"]
        unfreezer.best = math.inf if plateau["best"] is None else plateau["best"]
    else:
        before = evaluate() if n_eval else {}
    if lead and before:
        log.info("eval before training: %s", _fmt(before))
    begin = time.perf_counter()
    bar = progress(cfg.run.steps, enabled=lead)
    bar.update(start)
    for step in range(start, cfg.run.steps):
        t0 = time.perf_counter()
        epoch, batch = data.train.batch_at(step, cfg.data.batch_size, cfg.data.shuffle, cfg.run.seed) if lead \
            else (0, None)
        trainable = unfreezer.trainable(step, epoch) if lead else 0
        epoch, trainable = rt.broadcast_ints([epoch, trainable] if lead else None, 2)
        result = rt.train_step(step, L - trainable, batch, M)
        train_s += time.perf_counter() - t0
        loss = result["loss"]
        last_losses.append(loss)
        record = None
        if lead:
            tokens_total += input_tokens(batch)
            record = {"step": step, "loss": loss, "trainable_blocks": trainable, "frontier": L - trainable,
                      "epoch": epoch, "tokens": tokens_total, "elapsed_s": time.perf_counter() - begin,
                      "grad_norm": result["grad_norm"]}
        if n_eval and cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and step + 1 < cfg.run.steps:
            ev = evaluate()
            if lead:
                record.update(ev)
        if cfg.unfreeze.by == "plateau" and cfg.unfreeze.every and (step + 1) % cfg.unfreeze.every == 0:
            signal = evaluate()["eval_loss"] if n_eval else sum(last_losses) / len(last_losses)
            unfreezer.observe(signal)
            last_losses = []
        if lead:
            recorder.step(record)
            bar.update(1)
            if (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.run.steps:
                log.info("step %d/%d loss %.4f trainable %d/%d frontier %d tokens/s %.0f", step + 1, cfg.run.steps,
                         loss, trainable, L, L - trainable, tokens_total / max(train_s, 1e-9))
        if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
            checkpoint.write_rank(out, step + 1, topo.rank, checkpoint.rank_tensors(rt.adapters, rt.optimizer))
            rt.all_reduce_sum([0.0])  # every rank's file is on disk before the manifest makes the checkpoint count
            if lead:
                best = None if math.isinf(unfreezer.best) else unfreezer.best
                checkpoint.write_manifest(out, step + 1, {
                    "step": step + 1, "world_size": topo.world_size, "partition": list(topo.partition),
                    "config": checkpoint.config_fingerprint(cfg), "loss": loss, "tokens": tokens_total,
                    "train_s": train_s, "eval_before": before,
                    # the plateau signal gathered since the last unfreezing check
                    "last_losses": last_losses if cfg.unfreeze.by == "plateau" else [],
                    "unfreezer": {"plateaus": unfreezer.plateaus, "best": best, "stale": unfreezer.stale}})
    bar.close()
    wall = time.perf_counter() - begin
    after = evaluate() if n_eval else {}
    final_state = rt.gather_adapters(tag_step=1)
    if cfg.run.message_log:
        rt.write_message_log(out / "messages")
    ranks = rt.rank_summary()
    if not lead:
        return None
    save_adapters(out / "adapter", final_state, rt.adapters.config_json)
    summary = {
        "mode": topo.mode, "world_size": topo.world_size, "steps": cfg.run.steps, "final_loss": loss,
        **({"eval_loss": after["eval_loss"], "eval_before": before, "eval_after": after} if after else {}),
        "tokens_per_s": tokens_total / max(train_s, 1e-9), "wall_s": wall, "train_s": train_s,
        "num_blocks": L, "partition": topo.partition, "schedule": cfg.pipeline.schedule, "micro_batches": M,
        "adapter_params": sum(v.numel() for v in final_state.values()), "ranks": ranks,
        **({"resumed_from_step": start} if resume else {}),
    }
    recorder.summary(summary)
    if after:
        log.info("eval after training: %s (before: %s)", _fmt(after), _fmt(before))
    for r in ranks:
        log.info("rank %d blocks %s: fwd %.2fs bwd %.2fs wait %.2fs step %.2fs sent %s recv %s peak RSS %.0f MiB",
                 r["rank"], r["blocks"], r["fwd_s"], r["bwd_s"], r["wait_s"], r["step_s"], r["bytes_sent"],
                 r["bytes_recv"], r["peak_rss_bytes"] / 2**20)
    return summary


def _fmt(record: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in record.items())


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
    rt = PipelineRuntime(cfg, topo, torch.device("cpu"))
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
