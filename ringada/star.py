"""Star mode (split federated learning): rank 0 is the edge server, ranks 1..U are devices.

Device u holds the embedding, blocks [0, d_u) and LoRA for them (plus the head under label privacy). The server
holds the rest of the frozen base once, and either one LoRA set per device (`sfl`, served one device at a time in
the order its scheduler picks) or one shared set (`sft`, all devices' activations in one batch).

A round: the server picks devices and tells each how many local steps it will run (fewer when its dwell time
runs out: a dropout). A device step: forward its blocks → uplink activations (+ labels) → the server runs the
rest and the loss (or returns the top hidden state for the device's own head and loss) → downlink the
activation gradient → device backward and step. At the round's end the survivors' adapters are averaged
layer-wise, weighted by shard size, and every device and server set restarts from that global adapter.

Loss: each device trains on the token-weighted mean loss of its own batch. In `sft` the shared server set
follows the example-weighted mean of the devices' losses (the token-weighted mean over the union batch); the
gradient a device receives is that of its own mean loss.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .adapters import add_adapters, add_lora_sets, check_target_modules, lora_config, save_adapters
from .comm import ACT, ADAPTERS, CONTROL, GRAD, LABELS, TOP, TOP_GRAD, Wire, pack_state, unpack_state
from .compress import Codec, decode, encode
from .config import Config, ConfigError, check_against_model
from .federated.allocation import Allocation, AllocationProblem, DeviceProfile, allocate
from .data import Batch, Dataset
from .federated.aggregate import aggregate
from .federated.scheduling import makespan, server_order
from .federated.selection import Mobility, Selector, steps_before_leaving
from .federated.shards import shard_rows
from .models import load_model, num_blocks_of, parameter_counts, read_config, resolve_model_dir
from .profiles import load_profile
from .runtime import _fmt, gather_rank_rows
from .train import (RunRecorder, correct_count, eval_record, load_run_data, loss_sum, make_optimizer,
                    peak_rss_bytes, progress, run_blocks)

log = logging.getLogger(__name__)

TRAIN_ROUND, EVAL, STOP = 0, 1, 2


@dataclass
class StarTopology:
    rank: int
    world_size: int
    num_blocks: int
    depths: list[int]  # per device rank 1..U
    keep_ratios: list[float] | None = None  # per device, from star.allocate
    allocation: dict | None = None

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    @property
    def devices(self) -> list[int]:
        return list(range(1, self.world_size))

    def depth(self, device: int) -> int:
        return self.depths[device - 1]


def make_star_topology(cfg: Config, rank: int, world_size: int) -> StarTopology:
    num_blocks = num_blocks_of(cfg.model.path)
    check_against_model(cfg, num_blocks, world_size)
    blocks = cfg.star.device_blocks
    depths = list(blocks) if len(blocks) == world_size - 1 else [blocks[0]] * (world_size - 1)
    topo = StarTopology(rank=rank, world_size=world_size, num_blocks=num_blocks, depths=depths)
    if cfg.star.allocate:
        # Every rank solves the same deterministic problem, so all agree on depths without a message.
        result = plan_allocation(cfg, world_size - 1)
        topo.depths, topo.keep_ratios = list(result.depths), list(result.keep_ratios)
        topo.allocation = {"depths": list(result.depths), "keep_ratios": list(result.keep_ratios),
                           "uplink_share_bytes_per_s": list(result.bandwidth),
                           "predicted_round_delay_s": result.round_delay}
    return topo


def plan_allocation(cfg: Config, devices: int) -> Allocation:
    """The sft allocation problem from the profile and the model's real sizes.

    Compute: a frozen block costs ~4 flops per parameter and token (forward, and backward to its input only);
    device and server times are that over their profile GFLOP/s. Memory per block on a device: its fp32
    weights, LoRA with AdamW state (~3 copies of r*(in+out) per target, bounded here by 1% of the block) and
    about 16 saved activations of the batch; the embedding is the device's fixed base. Uplink bytes per round:
    the fp32 activation of a batch at the cut, per local step.
    """
    profile = load_profile(cfg.star.profile)
    if len(profile.devices) != devices:
        raise ConfigError(f"star.profile: {cfg.star.profile} describes {len(profile.devices)} devices but the run "
                          f"has {devices} (WORLD_SIZE - 1)")
    sizes = parameter_counts(cfg.model.path, cfg.model.task, cfg.model.num_labels)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    act_bytes = tokens * sizes["hidden"] * 4
    block_memory = sizes["block"] * 4 * 1.03 + 16 * act_bytes
    flops = 4 * sizes["block"] * tokens * cfg.star.local_steps
    problem = AllocationProblem(
        devices=tuple(DeviceProfile(block_time=flops / (d.gflops * 1e9), memory_budget=d.memory_mb * 2**20,
                                    base_memory=sizes["embedding"] * 4, act_bytes=act_bytes * cfg.star.local_steps)
                      for d in profile.devices),
        num_blocks=sizes["num_blocks"], block_memory=block_memory, uplink=profile.uplink_mbps * 1e6 / 8,
        downlink=profile.downlink_mbps * 1e6 / 8, server_block_time=flops / (profile.server_gflops * 1e9),
        error_budget=cfg.star.error_budget)
    result = allocate(problem)
    log.info("allocation: depths %s keep ratios %s predicted round delay %.2f s", list(result.depths),
             [round(r, 3) for r in result.keep_ratios], result.round_delay)
    return result


# ------------------------------------------------------------------------------------------------ the wire codec


class SmashedWire:
    """Activations and their gradients through the compression codec of the link (device <-> server); everything
    else as is."""

    def __init__(self, wire: Wire, codecs: dict[int, Codec], seed: int):
        self.wire, self.codecs, self.seed = wire, codecs, seed

    def send(self, dst: int, kind: int, step: int, tensor: torch.Tensor, extra: list[torch.Tensor] = ()) -> None:
        codec = self.codecs[dst if self.wire.rank == 0 else self.wire.rank]
        if not codec.is_identity:
            gen = torch.Generator().manual_seed(hash((self.seed, self.wire.rank, dst, kind, step)) % 2**63)
            tensor = encode(tensor.detach(), codec, gen)
        self.wire.send(dst, kind, step, 0, [tensor, *extra])

    def recv(self, src: int, kind: int, step: int) -> list[torch.Tensor]:
        tensors = self.wire.recv(src, kind, step, 0)
        if tensors[0].dtype == torch.uint8:  # a compressed blob
            tensors[0] = decode(tensors[0])
        return tensors


# ------------------------------------------------------------------------------------------------------ devices


@dataclass
class DeviceTimes:
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    train_cpu_s: float = 0.0  # the process's CPU seconds over training steps


class Device:
    """Embedding + blocks [0, d) + their LoRA (+ head and loss under label privacy) and its data shard."""

    def __init__(self, cfg: Config, topo: StarTopology, wire: SmashedWire, data, shard: Dataset):
        self.cfg, self.topo, self.wire = cfg, topo, wire
        self.depth = topo.depth(topo.rank)
        privacy = cfg.star.label_privacy
        self.cut = load_model(cfg.model.path, cfg.model.task, cfg.model.num_labels, blocks=(0, self.depth),
                              embed=True, head=privacy, seed=cfg.run.seed)
        self.adapters = add_adapters(self.cut, cfg.adapter, cfg.run.seed,
                                     base_dir=str(resolve_model_dir(cfg.model.path)))
        self.optimizer = make_optimizer(cfg, self.adapters)
        self.shard = shard
        self.eval_set = data.eval
        self.steps_done = 0
        self.times = DeviceTimes()
        self.last_bwd_s = 0.0

    def lower_forward(self, batch: Batch, train: bool) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.cut.embed(batch.input_ids)
            ctx = self.cut.context(hidden, batch.attention_mask)
        # micro-batch 0 and the device's own step count: the seeds a single process would use for its batch
        return run_blocks(self.cut, 0, self.depth, hidden, ctx, frontier=0, grad=train, training=train,
                          seed=self.cfg.run.seed, step=self.steps_done, micro_batch=0,
                          dropout=self.cfg.adapter.dropout > 0)

    def send_activation(self, batch: Batch, step: int, hidden: torch.Tensor, fwd_s: float) -> None:
        extra = [batch.attention_mask] if batch.attention_mask is not None else []
        # The device's own timings travel with the activation: the server's scheduler uses them next time.
        timing = torch.tensor([fwd_s, self.last_bwd_s], dtype=torch.float64)
        self.wire.send(0, ACT, step, hidden, [timing, *extra])
        if not self.cfg.star.label_privacy:
            self.wire.wire.send(0, LABELS, step, 0, [batch.labels])

    def head_loss(self, top: torch.Tensor, batch: Batch, step: int, train: bool) -> tuple[torch.Tensor, list[float]]:
        """Label privacy: the device's own head and loss on the server's top hidden state."""
        top.requires_grad_(train)
        with torch.set_grad_enabled(train):
            logits = self.cut.head(top, batch.attention_mask)
            total = loss_sum(logits, batch.labels)
        stats = [float(total), batch.count(), correct_count(logits.detach(), batch.labels)]
        if train:
            (total / batch.count()).backward()
            return top.grad, stats
        return None, stats

    def train_step(self, step: int) -> None:
        cpu0 = time.process_time()
        _, batch = self.shard.batch_at(self.steps_done, self.cfg.data.batch_size, self.cfg.data.shuffle,
                                       self.cfg.run.seed + self.topo.rank)
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        hidden = self.lower_forward(batch, train=True)
        fwd_s = time.perf_counter() - t0
        self.send_activation(batch, step, hidden, fwd_s)
        if self.cfg.star.label_privacy:
            top = self.wire.recv(0, TOP, step)[0]
            t1 = time.perf_counter()
            grad_top, stats = self.head_loss(top, batch, step, train=True)
            fwd_s += time.perf_counter() - t1
            self.wire.send(0, TOP_GRAD, step, grad_top, [torch.tensor(stats, dtype=torch.float64)])
        grad = self.wire.recv(0, GRAD, step)[0]
        t2 = time.perf_counter()
        hidden.backward(grad)
        self.optimizer.step()
        self.last_bwd_s = time.perf_counter() - t2
        self.times.fwd_s += fwd_s
        self.times.bwd_s += self.last_bwd_s
        self.steps_done += 1
        self.wire.wire.flush()  # the server has consumed this step's sends: release their buffers
        self.times.train_cpu_s += time.process_time() - cpu0

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> None:
        """Device 1 drives evaluation of the global model with the server (forward only)."""
        stats = [0.0, 0, 0]
        for j, batch in enumerate(batches):
            step = -1 - j
            self.send_activation(batch, step, self.lower_forward(batch, train=False), 0.0)
            if self.cfg.star.label_privacy:
                top = self.wire.recv(0, TOP, step)[0]
                _, s = self.head_loss(top, batch, step, train=False)
                stats = [a + b for a, b in zip(stats, s)]
        self.wire.wire.send(0, CONTROL, -99, 0, [torch.tensor(stats, dtype=torch.float64)])
        self.wire.wire.flush()

    def run(self) -> None:
        wire = self.wire.wire
        wire.send(0, ADAPTERS, 0, 0, pack_state(self.adapters.state_dict()))  # the initial global adapter
        wire.send(0, CONTROL, -96, 0, [torch.tensor([len(self.shard)])])  # its aggregation weight
        eval_batches = self.eval_set.eval_batches(self.cfg.data.batch_size, self.cfg.run.eval_batches) \
            if self.eval_set is not None and self.topo.rank == 1 else []
        if self.topo.rank == 1:
            wire.send(0, CONTROL, -98, 0, [torch.tensor([len(eval_batches)] + [b.size for b in eval_batches])])
        while True:
            command, round_index, steps = wire.recv(0, CONTROL, -97, 0)[0].tolist()
            wire.flush()
            if command == STOP:
                return
            if command == EVAL:
                self.evaluate(eval_batches)
                continue
            for k in range(steps):
                self.train_step(round_index * self.cfg.star.local_steps + k)
            if steps:
                wire.send(0, ADAPTERS, round_index, 1, pack_state(self.adapters.state_dict()))
            self.adapters.load_state_dict(unpack_state(wire.recv(0, ADAPTERS, round_index, 2)))


# ------------------------------------------------------------------------------------------------------ server


@dataclass
class ServerProfile:
    """Last measurements per device, for the scheduler and for client selection."""

    release: dict[int, float] = field(default_factory=dict)
    server: dict[int, float] = field(default_factory=dict)
    tail: dict[int, float] = field(default_factory=dict)
    step_time: dict[int, float] = field(default_factory=dict)


class Server:
    def __init__(self, cfg: Config, topo: StarTopology, wire: SmashedWire):
        self.cfg, self.topo, self.wire = cfg, topo, wire
        self.sft = cfg.pipeline.mode == "sft"
        self.privacy = cfg.star.label_privacy
        L = topo.num_blocks
        low = min(topo.depths)
        self.model_dir = str(resolve_model_dir(cfg.model.path))
        if self.sft:
            sets = {"shared": (low, L)}
        else:
            sets = {f"dev{u}": (topo.depth(u), L) for u in topo.devices}

        def base(lo: int):
            return load_model(cfg.model.path, cfg.model.task, cfg.model.num_labels, blocks=(lo, L), embed=False,
                              head=not self.privacy, seed=cfg.run.seed)

        # name -> (cut model, peft model) serving that LoRA set: one shared frozen base, or (star.server_copies,
        # the baseline memory-efficient SFL improves on) a separate base copy per device
        self.models, self.sets = {}, {}
        if cfg.star.server_copies:
            for name, (lo, hi) in sets.items():
                cut = base(lo)
                peft_model, adapters = add_lora_sets(cut, cfg.adapter, cfg.run.seed, {name: (lo, hi)}, self.model_dir)
                self.models[name], self.sets[name] = (cut, peft_model), adapters[name]
        else:
            cut = base(low)
            peft_model, self.sets = add_lora_sets(cut, cfg.adapter, cfg.run.seed, sets, self.model_dir)
            self.models = {name: (cut, peft_model) for name in sets}
        self.optimizers = {name: make_optimizer(cfg, a) for name, a in self.sets.items()}
        self.config_json = lora_config(cfg.adapter, cut, self.model_dir).to_dict()
        self.profile = ServerProfile()
        self.mobility = Mobility(cfg.star.mobility, cfg.star.dwell_mean)
        self.selector = Selector(cfg.star.selection, cfg.star.devices_per_round, seed=cfg.run.seed, c=cfg.star.ucb_c)
        self.rng = random.Random(cfg.run.seed)
        self.fwd_s = self.bwd_s = 0.0
        self.n_eval = 0
        self.device_loss: dict[int, float] = {}  # each device's last training loss (client selection)

    def set_name(self, device: int) -> str:
        return "shared" if self.sft else f"dev{device}"

    def cut_for(self, device: int):
        return self.models[self.set_name(device)][0]

    def activate(self, device: int) -> None:
        self.models[self.set_name(device)][1].set_adapter(self.set_name(device))

    # -- one device through the server part (sfl), or the joint batch (sft)
    def _upper(self, devices: list[int], hiddens: list[torch.Tensor], masks: list, train: bool, step: int) -> list:
        """The server's blocks for several devices as one batch: a device's rows join the batch at its cut
        (its depth) and leave it at the top. Returns each device's top hidden state."""
        t0 = time.perf_counter()
        cut = self.cut_for(devices[0])
        joined, mask, members = None, None, []
        for b in range(min(self.topo.depth(u) for u in devices), self.topo.num_blocks):
            joining = [i for i, u in enumerate(devices) if self.topo.depth(u) == b]
            if joining:
                members += joining
                joined = torch.cat(([joined] if joined is not None else []) + [hiddens[i] for i in joining])
                if masks[0] is not None:
                    mask = torch.cat(([mask] if mask is not None else []) + [masks[i] for i in joining])
                with torch.no_grad():
                    ctx = cut.context(joined, mask)
            joined = run_blocks(cut, b, b + 1, joined, ctx, frontier=0, grad=train, training=train,
                                seed=self.cfg.run.seed, step=step, dropout=self.cfg.adapter.dropout > 0)
        pieces = torch.split(joined, [hiddens[i].shape[0] for i in members])
        tops = [None] * len(devices)
        for i, piece in zip(members, pieces):
            tops[i] = piece
        self.fwd_s += time.perf_counter() - t0
        return tops

    def _receive(self, device: int, step: int, train: bool):
        tensors = self.wire.recv(device, ACT, step)
        hidden, timing = tensors[0], tensors[1]
        mask = tensors[2] if len(tensors) > 2 else None
        labels = None if self.privacy else self.wire.wire.recv(device, LABELS, step, 0)[0]
        hidden.requires_grad_(train)
        return hidden, mask, labels, timing.tolist()

    def serve_sfl(self, device: int, step: int) -> tuple[float, float, int]:
        """One device's step on its own server set; returns (loss sum, server seconds, counted targets)."""
        hidden, mask, labels, (fwd_s, bwd_s) = self._receive(device, step, train=True)
        t0 = time.perf_counter()
        self.activate(device)
        tops = self._upper([device], [hidden], [mask], train=True, step=step)
        loss_value, count = self._loss_and_backward([device], [hidden], tops, [mask], [labels], step)
        self.wire.send(device, GRAD, step, hidden.grad)
        name = self.set_name(device)
        self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        self.profile.release[device], self.profile.tail[device] = fwd_s, bwd_s
        self.profile.server[device] = elapsed
        return loss_value, elapsed, count

    def serve_sft(self, devices: list[int], step: int) -> tuple[float, float, int]:
        """All active devices' activations as one batch through the shared set; one optimizer step."""
        received = [self._receive(u, step, train=True) for u in devices]
        t0 = time.perf_counter()
        tops = self._upper(devices, [r[0] for r in received], [r[1] for r in received], train=True, step=step)
        loss_value, count = self._loss_and_backward(devices, [r[0] for r in received], tops, [r[1] for r in received],
                                                    [r[2] for r in received], step)
        for u, (h, _, _, timing) in zip(devices, received):
            self.wire.send(u, GRAD, step, h.grad)
            self.profile.release[u], self.profile.tail[u] = timing
        self.optimizers["shared"].step()
        self.optimizers["shared"].zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        for u in devices:
            self.profile.server[u] = elapsed / len(devices)
        return loss_value, elapsed, count

    def _loss_and_backward(self, devices, hiddens, tops, masks, labels, step) -> tuple[float, int]:
        """Backward of sum_u w_u * loss_u (w_u = 1 in sfl; the share of targets in sft), then every device's
        activation gradient rescaled to that of its own mean loss."""
        if self.privacy:
            for u, top in zip(devices, tops):
                self.wire.send(u, TOP, step, top)
            grads, stats = [], []
            for u in devices:
                g, s = self.wire.recv(u, TOP_GRAD, step)
                grads.append(g)
                stats.append(s.tolist())
            counts = [int(s[1]) for s in stats]
            total = sum(counts)
            for u, st in zip(devices, stats):
                self.device_loss[u] = st[0] / max(st[1], 1)
            weights = [c / total for c in counts] if self.sft else [1.0] * len(devices)
            t0 = time.perf_counter()
            torch.autograd.backward(tops, [w * g for w, g in zip(weights, grads)])
            self.bwd_s += time.perf_counter() - t0
            loss_value = sum(s[0] for s in stats)
        else:
            counts = [Batch(lab, lab).count() for lab in labels]
            total = sum(counts)
            weights = [c / total for c in counts] if self.sft else [1.0] * len(devices)
            losses = []
            for top, mask, lab, c in zip(tops, masks, labels, counts):
                losses.append(loss_sum(self.cut_for(devices[0]).head(top, mask), lab))
            loss_value = float(sum(l.detach() for l in losses))
            for u, l, c in zip(devices, losses, counts):
                self.device_loss[u] = float(l.detach()) / max(c, 1)
            joint = sum(w * l / c for w, l, c in zip(weights, losses, counts))
            t0 = time.perf_counter()
            joint.backward()
            self.bwd_s += time.perf_counter() - t0
        for w, h in zip(weights, hiddens):
            if w != 1.0:
                h.grad.div_(w)
        return loss_value, total

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Forward-only through device 1 and device 1's (global, after aggregation) server set."""
        self.wire.wire.send(1, CONTROL, -97, 0, [torch.tensor([EVAL, 0, 0])])
        loss, count, correct = 0.0, 0, 0
        self.activate(1)
        for j in range(self.n_eval):
            step = -1 - j
            hidden, mask, labels, _ = self._receive(1, step, train=False)
            top = self._upper([1], [hidden], [mask], train=False, step=step)[0]
            if self.privacy:
                self.wire.send(1, TOP, step, top)
            else:
                logits = self.cut_for(1).head(top, mask)
                loss += float(loss_sum(logits, labels))
                count += Batch(labels, labels).count()
                correct += correct_count(logits, labels)
        device_stats = self.wire.wire.recv(1, CONTROL, -99, 0)[0].tolist()
        self.wire.wire.flush()
        return eval_record(loss + device_stats[0], count + int(device_stats[1]), correct + int(device_stats[2]),
                           self.cfg.model.task)

    # -- adapters
    def global_state(self, device_views: dict[int, dict], devices: list[int], weights: dict[int, float]) -> dict:
        """Layer-wise FedAvg of the devices' views: device u's own adapters below its cut, the server set that
        trained on its data from the cut up (in sft the shared set reaches lower than some devices' cuts; those
        blocks trained on u's device, so u's view takes them from there)."""
        views = []
        for u in devices:
            view = dict(device_views[u])
            depth = self.topo.depth(u)
            for p in self.sets[self.set_name(u)].params:
                if p.block is None or p.block >= depth:
                    view[p.key] = p.param.detach().clone()
            views.append((weights[u], view))
        return aggregate(views)

    def load_global(self, state: dict) -> None:
        for adapters in self.sets.values():
            adapters.load_state_dict(state, strict=False)

    def memory_report(self) -> dict:
        """What the server holds, and what one server-side model copy per device would hold instead."""
        distinct = {id(cut): cut for cut, _ in self.models.values()}.values()
        bases = [{n: p for n, p in cut.model.named_parameters() if "lora_" not in n and "modules_to_save" not in n}
                 for cut in distinct]
        base_bytes = sum(p.numel() * p.element_size() for b in bases for p in b.values())
        base = max(bases, key=len)  # the copy with the most blocks: every block's size appears in it
        adapter_bytes = sum(a.numel() * 4 for a in self.sets.values())
        optim_bytes = sum(t.numel() * t.element_size() for o in self.optimizers.values() if o is not None
                          for state in o.state.values() for t in state.values() if torch.is_tensor(t))
        per_block = {}
        for n, p in base.items():
            m = re.search(r"\.(?:layers|h|layer)\.(\d+)\.", n)
            if m:
                per_block[int(m.group(1))] = per_block.get(int(m.group(1)), 0) + p.numel() * p.element_size()
        other = sum(p.numel() * p.element_size() for p in base.values()) - sum(per_block.values())
        copies = sum(other + sum(v for b, v in per_block.items() if b >= self.topo.depth(u))
                     for u in self.topo.devices)
        return {"peak_rss_bytes": peak_rss_bytes(), "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
                "optimizer_bytes": optim_bytes, "sets": len(self.sets),
                "copy_per_device_base_bytes": copies,
                "held_bytes": base_bytes + adapter_bytes + optim_bytes,
                "copy_per_device_bytes": copies + adapter_bytes + optim_bytes}


# ------------------------------------------------------------------------------------------------------ driver


def train_star(cfg: Config, rank: int, world_size: int) -> dict | None:
    """Config, LoRA targets and (on devices) data and shards are checked before the process group starts."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    topo = make_star_topology(cfg, rank, world_size)
    check_target_modules(cfg.adapter, cfg.model.path, cfg.model.task)
    data = shard = None
    if not topo.is_server:
        data = load_run_data(cfg, read_config(cfg.model.path).vocab_size)
        rows = shard_rows(data.train.groups, world_size - 1, cfg.star.split, cfg.star.alpha, cfg.run.seed,
                          cfg.data.batch_size)[rank - 1]
        shard = data.train.subset(rows, f"{data.train.name}:device{rank}")
    torch.manual_seed(cfg.run.seed)
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend="gloo")
    try:
        keep = topo.keep_ratios or [cfg.compress.topk] * (world_size - 1)
        codecs = {u: Codec(topk=1.0 if keep[u - 1] >= 1.0 - 1e-9 else keep[u - 1], bits=cfg.compress.bits,
                           lossless=cfg.compress.lossless) for u in topo.devices}
        wire = SmashedWire(Wire(rank, world_size), codecs, cfg.run.seed)
        if topo.is_server:
            return _serve(cfg, topo, wire)
        device = Device(cfg, topo, wire, data, shard)
        device.run()
        gather_rank_rows(world_size, {"rank": rank, "blocks": [0, device.depth], "fwd_s": device.times.fwd_s,
                                      "bwd_s": device.times.bwd_s, "train_cpu_s": device.times.train_cpu_s},
                         wire.wire.counters)
        return None
    finally:
        dist.destroy_process_group()


def _serve(cfg: Config, topo: StarTopology, wire: SmashedWire) -> dict:
    server = Server(cfg, topo, wire)
    raw = wire.wire
    L, star = topo.num_blocks, cfg.star
    out = Path(cfg.run.out_dir)
    recorder = RunRecorder(cfg)
    device_views = {u: unpack_state(raw.recv(u, ADAPTERS, 0, 0)) for u in topo.devices}
    shard_sizes = {u: float(raw.recv(u, CONTROL, -96, 0)[0].item()) for u in topo.devices}
    server.n_eval = raw.recv(1, CONTROL, -98, 0)[0].tolist()[0]
    global_state = server.global_state(device_views, topo.devices, shard_sizes)
    save_adapters(out / "adapter_init", global_state, server.config_json)
    before = server.evaluate() if server.n_eval else {}
    if before:
        log.info("eval before training: %s", _fmt(before))
    start = time.perf_counter()
    tokens, train_s, train_cpu_s, loss, rounds_log = 0, 0.0, 0.0, float("nan"), []
    bar = progress(cfg.run.steps, enabled=True)
    for t in range(star.rounds):
        selected = server.selector.select(t, topo.devices)
        dwell = server.mobility.dwell_times(server.rng, selected)
        plan = {u: steps_before_leaving(dwell[u], server.profile.step_time.get(u, 0.0), star.local_steps)
                for u in selected}
        for u in topo.devices:
            raw.send(u, CONTROL, -97, 0, [torch.tensor([TRAIN_ROUND, t, plan.get(u, 0)])])
        round_start = time.perf_counter()
        step_records = []
        for k in range(star.local_steps):
            step = t * star.local_steps + k
            active = [u for u in selected if plan[u] > k]
            t0, cpu0 = time.perf_counter(), time.process_time()
            record = {"step": step, "round": t, "devices": active, "trainable_blocks": L, "loss": None}
            if active:
                if server.sft:
                    loss_sum_value, _, count = server.serve_sft(active, step)
                    order = active
                else:
                    prof = server.profile
                    times = [[prof.release.get(u, 0.0) for u in active], [prof.server.get(u, 0.0) for u in active],
                             [prof.tail.get(u, 0.0) for u in active]]
                    order_idx = server_order(star.schedule, *times)
                    order = [active[i] for i in order_idx]
                    loss_sum_value, count = 0.0, 0
                    for u in order:
                        value, _, c = server.serve_sfl(u, step)
                        loss_sum_value, count = loss_sum_value + value, count + c
                    record["predicted_makespan_s"] = makespan(order_idx, *times)
                    record["fifo_makespan_s"] = makespan(server_order("fifo", *times), *times)
                raw.flush()
                loss = loss_sum_value / max(count, 1)
                record.update({"loss": loss, "order": order, "step_s": time.perf_counter() - t0})
                tokens += len(active) * cfg.data.batch_size * cfg.data.seq_len
            train_s += time.perf_counter() - t0
            train_cpu_s += time.process_time() - cpu0
            record.update({"tokens": tokens, "elapsed_s": time.perf_counter() - start})
            step_records.append(record)
            bar.update(1)
        round_s = time.perf_counter() - round_start
        for u in selected:
            if plan[u]:
                # the round's time over its step slots: a device that left early is not charged for the slots
                # it missed (that would make it look slower and leave sooner next time)
                server.profile.step_time[u] = round_s / star.local_steps
        # aggregation over the devices that finished the round
        finished = [u for u in selected if plan[u] == star.local_steps]
        dropped = [u for u in selected if plan[u] < star.local_steps]
        for u in selected:
            if plan[u]:
                device_views[u] = unpack_state(raw.recv(u, ADAPTERS, t, 1))
        skipped = len(finished) < star.min_devices
        if not skipped:
            global_state = server.global_state(device_views, finished, shard_sizes)
        server.load_global(global_state)
        for u in topo.devices:
            device_keys = {k: v for k, v in global_state.items() if k in device_views[u]}
            raw.send(u, ADAPTERS, t, 2, pack_state(device_keys))
            device_views[u] = device_keys
        raw.flush()
        prof = server.profile
        for u in selected:
            delay = prof.release.get(u, 0.0) + prof.server.get(u, 0.0) + prof.tail.get(u, 0.0)
            server.selector.record(u, u in finished, server.device_loss.get(u), delay or None)
        save_adapters(out / "rounds" / f"round_{t:04d}", global_state, server.config_json)
        round_info = {"round_selected": selected, "round_finished": finished, "round_dropped": dropped,
                      "round_skipped": skipped, "round_s": round_s}
        step_records[-1].update(round_info)
        if star.mobility != "none" or skipped:
            log.info("round %d: selected %s finished %s dropped %s%s", t, selected, finished, dropped,
                     " (skipped: fewer than star.min_devices)" if skipped else "")
        every, done = cfg.run.eval_every, (t + 1) * star.local_steps
        if every and server.n_eval and done // every > (done - star.local_steps) // every and t + 1 < star.rounds:
            step_records[-1].update(server.evaluate())
        for r in step_records:
            recorder.step(r)
        last = [r["loss"] for r in step_records if "loss" in r]
        if last:
            loss = last[-1]
        log.info("round %d/%d loss %.4f devices %s", t + 1, star.rounds, loss, selected)
        rounds_log.append(round_info)
    bar.close()
    wall = time.perf_counter() - start
    after = server.evaluate() if server.n_eval else {}
    for u in topo.devices:
        raw.send(u, CONTROL, -97, 0, [torch.tensor([STOP, 0, 0])])
    raw.flush()
    save_adapters(out / "adapter", global_state, server.config_json)
    ranks = gather_rank_rows(topo.world_size, {"rank": 0, "blocks": [min(topo.depths), L], "fwd_s": server.fwd_s,
                                               "bwd_s": server.bwd_s, "train_cpu_s": train_cpu_s}, raw.counters)
    summary = {
        "mode": cfg.pipeline.mode, "world_size": topo.world_size, "steps": cfg.run.steps, "rounds": star.rounds,
        "final_loss": loss, **({"eval_loss": after["eval_loss"], "eval_before": before, "eval_after": after}
                               if after else {}),
        "tokens_per_s": tokens / max(train_s, 1e-9), "wall_s": wall, "train_s": train_s, "num_blocks": L,
        "device_blocks": topo.depths, "compress": {"topk": cfg.compress.topk, "bits": cfg.compress.bits,
                                                   "lossless": cfg.compress.lossless},
        **({"allocation": topo.allocation} if topo.allocation else {}),
        "bytes_on_wire": sum(r["bytes_sent"] for r in ranks), "server": server.memory_report(), "ranks": ranks,
        "rounds_log": rounds_log,
    }
    recorder.summary(summary)
    if after:
        log.info("eval after training: %s (before: %s)", _fmt(after), _fmt(before))
    return summary
