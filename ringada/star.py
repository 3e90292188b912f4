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

Links and failures (DESIGN: failure semantics). Each device talks to the server over a process group of its
own ([0, u]; the server waits run.timeout_s for it) and over nothing else: after start-up nothing waits on the whole world,
which a dead device could block. What a link carries is planned as data (:func:`round_plan` and its siblings:
named messages in order, derived alike on both ends and checked as they pass). An error or a timeout on a link
makes its device *lost*: it is out of that round and of every later one, and the round aggregates the survivors
exactly as it does mobility dropouts: the global adapter and every server set are rebuilt at the round's end
from the views of the devices that finished, so a lost device's half-done round is dropped (in sft, the shared
server set's steps taken with its data before it was lost stay in the survivors' views, as a mobility
dropout's do). The server checkpoints each committed round (global adapter, every optimizer state, selection
statistics, RNG), so a restart of the whole star continues from the last round, with every device back.

Compression (the compress section; ringada/compress.py). Smashed tensors travel through the codec of their
direction: activations and the top hidden state with compress.bits and rounding, their gradients with
compress.grad_bits, always rounded stochastically, with error feedback per device link when asked for (kept in
memory only: a restart starts it from zero). Evaluations travel exactly unless compress.eval is codec; with a
lossy codec each evaluation runs twice, once per link, and the summary reports both (eval_after_exact,
eval_after_codec) and, under compress.smashed, the bytes of training's smashed tensors before and after the codec.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .adapters import add_adapters, add_lora_sets, check_target_modules, lora_config, save_adapters
from .comm import (ACT, ADAPTERS, CHECKPOINT, CONTROL, EVAL_ACT, EVAL_TOP, GRAD, LABELS, STATS, TOP, TOP_GRAD, Counters, PeerError,
                   Placement, ProtocolError, Wire, link_group, pack_state, unpack_state)
from .compress import Codec, LinkCodecs, SmashedCodec, link_codecs
from .config import Config, ConfigError, check_against_model, check_compress_against_model
from .data import Batch, Dataset
from .driver import Trainer, UnitResult
from .federated.aggregate import aggregate
from .federated.allocation import (Allocation, AllocationProblem, DeviceProfile, allocate, max_depths,
                                  snap_to_settings)
from .federated.scheduling import makespan, server_order
from .federated.selection import DeviceStats, Mobility, Selector, steps_before_leaving
from .federated.shards import shard_rows
from .memory import memory_model
from .models import load_model, num_blocks_of, parameter_counts, read_config, resolve_model_dir
from .profiles import load_profile
from .runtime import base_dtype, decode_row, emulated_slowdown, rank_row
from .train import eval_record, load_run_data, make_optimizer, peak_rss_bytes, rss_bytes, run_blocks
from .train import head_loss as head_loss_sum

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ the protocol


UP, DOWN = "up", "down"  # device -> server, server -> device
DEVICE_PATIENCE = 20  # a device waits this many run.timeout_s for the server (see StarJob.build)
TRAIN, EVAL, STOP = 0, 1, 2  # commands

# Every message a link carries: name -> (direction, wire kind, micro-batch code). Its step field holds the global
# step (training exchanges), the round (round-level messages) or -1 - j (eval batch j).
MESSAGES = {
    "status": (DOWN, CONTROL, 0),  # [accepted, step resumed after or -1]
    "hello": (UP, STATS, 0),  # [shard size, eval batches, their sizes...]
    "view": (UP, ADAPTERS, 0),  # the device's initial adapters (the first global adapter is their FedAvg)
    "restore": (DOWN, CHECKPOINT, 0),  # resumed device state: adapters, AdamW state, data position
    "command": (DOWN, CONTROL, 1),  # [command, round or evaluator flag, local steps or eval link (EVAL_LINKS)]
    "activation": (UP, ACT, 0),  # smashed hidden state [+ timing, attention mask]
    "labels": (UP, LABELS, 0),
    "top": (DOWN, TOP, 0),  # smashed top hidden state (label privacy)
    "top_gradient": (UP, TOP_GRAD, 0),  # smashed [+ loss sum, targets, correct]
    "gradient": (DOWN, GRAD, 0),  # smashed [+ skip flag: a non-finite step updates nothing]
    "device_state": (UP, CHECKPOINT, 1),  # adapters + AdamW state after the round, + [steps done, skipped, bwd s]
    "global": (DOWN, ADAPTERS, 2),  # the new global adapter (the device's blocks) + [the run stops here]
    "eval_stats": (UP, STATS, 1),  # [loss sum, targets, correct] of the device's head (label privacy)
    "row": (UP, STATS, 2),  # the device's summary row
}
SMASHED = frozenset({"activation", "top", "top_gradient", "gradient"})  # what goes through the codec
GRADIENTS = frozenset({"top_gradient", "gradient"})  # smashed gradients: the gradient codec, error feedback
EXACT, CODEC = "exact", "codec"
EVAL_LINKS = (EXACT, CODEC)  # how an evaluation's smashed data travels (compress.eval)


@dataclass(frozen=True)
class Msg:
    name: str
    step: int

    @property
    def direction(self) -> str:
        return MESSAGES[self.name][0]

    def __str__(self) -> str:
        arrow = {UP: "^", DOWN: "v"}.get(MESSAGES.get(self.name, ("?",))[0], "?")
        return f"{arrow}{self.name}@{self.step}"


def start_plan(resuming: bool) -> list[Msg]:
    """Start-up: the server's verdict on the run (and where it resumes), the device's hello and adapters, and on
    a resume the device's restored state."""
    return [Msg("status", 0), Msg("hello", 0), Msg("view", 0)] + ([Msg("restore", 0)] if resuming else [])


def round_plan(round_index: int, steps: int, local_steps: int, privacy: bool) -> list[Msg]:
    """One device's link in one round in which it runs ``steps`` local steps (0: not selected)."""
    plan = [Msg("command", round_index)]
    for k in range(steps):
        s = round_index * local_steps + k
        plan += [Msg("activation", s)] + ([Msg("top", s), Msg("top_gradient", s)] if privacy else [Msg("labels", s)])
        plan.append(Msg("gradient", s))
    if steps:
        plan.append(Msg("device_state", round_index))
    return plan + [Msg("global", round_index)]


def eval_plan(evaluator: bool, batches: int, privacy: bool) -> list[Msg]:
    """An evaluation: only the evaluator's link carries its eval batches (forward only)."""
    plan = [Msg("command", -1)]
    if evaluator:
        for j in range(batches):
            plan += [Msg("activation", -1 - j), Msg("top" if privacy else "labels", -1 - j)]
        plan.append(Msg("eval_stats", -1))
    return plan


def stop_plan() -> list[Msg]:
    return [Msg("command", -2), Msg("row", -2)]


def check_plan(plan: list[Msg]) -> None:
    """Raise ValueError unless every step's exchange is complete and in causal order: the activation first, then
    labels or the top hidden state and its gradient, then the activation gradient; round-level messages after
    the steps they follow."""
    order = {"activation": 0, "labels": 1, "top": 1, "top_gradient": 2, "gradient": 3}
    at: dict[int, list[str]] = {}
    for i, m in enumerate(plan):
        if m.name not in MESSAGES:
            raise ValueError(f"message {i} ({m}): unknown name")
        if m.name in order and m.step >= 0:
            seen = at.setdefault(m.step, [])
            if seen and order[m.name] <= order[seen[-1]]:
                raise ValueError(f"message {i} ({m}) comes after {seen[-1]} of the same step")
            seen.append(m.name)
    for step, names in at.items():
        if names[0] != "activation" or names[-1] != "gradient":
            raise ValueError(f"step {step}: incomplete exchange {names}")


def format_plan(plan: list[Msg]) -> str:
    """``^`` marks a message up (device -> server), ``v`` one down."""
    return " ".join(str(m) for m in plan)


class Link:
    """One device's channel to the server, from either end: named messages in the order of the plan both ends
    derived, each checked against it; activations and their gradients through the codecs of their direction.

    Evaluation messages (negative steps) travel exactly unless ``eval_codec`` is set (compress.eval and the
    second evaluation pass). ``smashed`` counts, per message name, the smashed tensors of training steps this end
    sent or received: [messages, bytes uncompressed, bytes of what travelled]."""

    def __init__(self, rank: int, peer: int, wire: Wire, codecs: LinkCodecs | Codec, seed: int, at_server: bool,
                 dtype: torch.dtype = torch.float32):
        """``codecs``: the link's codecs (one Codec: the same both ways). ``dtype``: of the hidden states and their
        gradients (run.dtype), which a decoded blob is cast back to."""
        if isinstance(codecs, Codec):
            codecs = LinkCodecs(activation=codecs, gradient=codecs)
        self.rank, self.peer, self.wire, self.codecs, self.dtype = rank, peer, wire, codecs, dtype
        # error feedback, when on, keeps this end's gradient streams (the server's downlink to this device, a
        # device's top gradient) across rounds
        self.smash = SmashedCodec(codecs, seed)
        self.eval_codec = False
        self.smashed: dict[str, list[int]] = {}
        self.outgoing = DOWN if at_server else UP
        self.plan: deque[Msg] = deque()
        self.lost = False  # the server gave up on this link (an error or a timeout): it is never used again
        self.last_bytes = 0

    def follow(self, plan: list[Msg]) -> None:
        self.plan.extend(plan)

    def _next(self, name: str, step: int, direction: str) -> tuple[int, int]:
        want = self.plan.popleft() if self.plan else None
        got = Msg(name, step)
        if want != got or MESSAGES[name][0] != direction:
            raise ProtocolError(f"rank {self.rank}, link to rank {self.peer}: the plan says {want}, not {got}")
        kind, mb = MESSAGES[name][1:]
        if step < 0:  # an evaluation's hidden states: byte counters keep them apart from training's smashed data
            kind = {ACT: EVAL_ACT, TOP: EVAL_TOP}.get(kind, kind)
        return kind, mb

    def send(self, name: str, step: int, tensors: list[torch.Tensor]) -> None:
        kind, mb = self._next(name, step, self.outgoing)
        if name in SMASHED:
            tensors = [self._encode(name, kind, step, tensors[0]), *tensors[1:]]
        self.wire.send(self.peer, kind, step, mb, tensors)

    def recv(self, name: str, step: int) -> list[torch.Tensor]:
        kind, mb = self._next(name, step, UP if self.outgoing == DOWN else DOWN)
        tensors = self.wire.recv(self.peer, kind, step, mb)
        if name in SMASHED:
            travelled = tensors[0]
            tensors[0] = self.smash.unpack(travelled, self.wire.device, self.dtype)
            self._count(name, step, tensors[0], travelled)
        return tensors

    def _encode(self, name: str, kind: int, step: int, x: torch.Tensor) -> torch.Tensor:
        """What travels for smashed tensor ``x``: see :class:`SmashedCodec`; an exact evaluation sends ``x``."""
        out = x
        if step >= 0 or self.eval_codec:
            out = self.smash.pack(x, name in GRADIENTS, (self.rank, self.peer, kind, step),
                                  stream=name if step >= 0 else None)
        self._count(name, step, x, out)
        return out

    def _count(self, name: str, step: int, tensor: torch.Tensor, travelled: torch.Tensor) -> None:
        self.last_bytes = travelled.numel() * travelled.element_size()  # the last smashed message, either way
        if step >= 0:
            entry = self.smashed.setdefault(name, [0, 0, 0])
            entry[0] += 1
            entry[1] += tensor.numel() * tensor.element_size()
            entry[2] += travelled.numel() * travelled.element_size()

    def flush(self) -> None:
        self.wire.flush()


def _link_codecs(cfg: Config, topo: StarTopology) -> dict[int, LinkCodecs]:
    if topo.bits is not None:  # a calibrated allocation chose each device's activation bits
        grad_bits = cfg.compress.grad_bits if cfg.compress.grad_bits is not None else cfg.compress.bits
        return {u: link_codecs(dataclasses.replace(cfg.compress, bits=topo.bits[u - 1], grad_bits=grad_bits))
                for u in topo.devices}
    keep = topo.keep_ratios or [cfg.compress.topk] * len(topo.devices)
    return {u: link_codecs(cfg.compress, keep[u - 1]) for u in topo.devices}


def eval_links(cfg: Config, topo: StarTopology) -> list[str]:
    """How one evaluation's smashed data travels, pass by pass: compress.eval's link first (it gives eval_loss),
    then, when some device's codec is lossy, the other one, so that a run shows what compression costs."""
    head = cfg.compress.eval
    lossy = any(c.is_lossy for c in _link_codecs(cfg, topo).values())
    return [head] + ([EXACT if head == CODEC else CODEC] if lossy else [])


def smashed_summary(links: list[Link]) -> dict:
    """Smashed data of training steps as the links saw it: bytes uncompressed (the tensors' own size) and bytes
    that travelled (blobs, or the tensors sent as they were), per message name and in all."""
    names: dict[str, dict] = {}
    for link in links:
        for name, (messages, raw, coded) in link.smashed.items():
            entry = names.setdefault(name, {"messages": 0, "raw_bytes": 0, "coded_bytes": 0})
            entry["messages"] += messages
            entry["raw_bytes"] += raw
            entry["coded_bytes"] += coded
    raw = sum(e["raw_bytes"] for e in names.values())
    coded = sum(e["coded_bytes"] for e in names.values())
    return {"raw_bytes": raw, "coded_bytes": coded, "ratio": coded / raw if raw else None,
            "by_message": dict(sorted(names.items()))}


@dataclass
class StarTopology:
    rank: int
    world_size: int
    num_blocks: int
    depths: list[int]  # per device rank 1..U
    keep_ratios: list[float] | None = None  # per device, from star.allocate
    bits: list[int] | None = None  # per device, from star.allocate with a quantizing codec (0: float32)
    allocation: dict | None = None

    server = 0  # the server's rank; devices are the ranks after it

    @property
    def is_server(self) -> bool:
        return self.rank == self.server

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
    if cfg.compress.hadamard:
        check_compress_against_model(cfg, read_config(cfg.model.path).hidden_size)
    if cfg.star.allocate:
        # Every rank solves the same deterministic problem, so all agree on depths without a message.
        result, settings = plan_allocation(cfg, world_size - 1)
        topo.depths = list(result.depths)
        topo.allocation = {"depths": list(result.depths), "keep_ratios": list(result.keep_ratios),
                           "uplink_share_bytes_per_s": list(result.bandwidth),
                           "predicted_round_delay_s": result.round_delay}
        if settings is None:
            topo.keep_ratios = list(result.keep_ratios)
        else:
            topo.bits = [bits for bits, _ in settings]
            topo.allocation.update({"bits": topo.bits, "measured_loss_increase": [e for _, e in settings],
                                    "loss_budget": cfg.star.loss_budget})
    return topo


def plan_allocation(cfg: Config, devices: int) -> tuple[Allocation, list[tuple[int, float]] | None]:
    """The sft allocation problem from the profile and the model's real sizes, solved; with a quantizing codec
    also each device's (bits, measured loss increase).

    Error. With top-k only, the dropped activation fraction against star.error_budget. With compress.bits > 0,
    measured (ringada/calibrate.py): each device's curve of (bytes ratio, relative loss increase) over the bits
    it may use, the worst over the cuts its memory allows, cut at star.loss_budget; their equally weighted sum
    is held to the same budget (Note: calibrated error in federated/allocation.py), and each keep ratio is
    rounded up to a real setting.

    Compute: a frozen block costs ~4 flops per parameter and token (forward, and backward to its input only);
    device and server times are that over their profile GFLOP/s. Memory (ringada/memory.py): per block its
    weights, adapters and the saved activations of one batch; the embedding (and under label privacy the head)
    is the device's fixed base. Uplink bytes per round: the fp32 activation of a batch at the cut, per local
    step.
    """
    profile = load_profile(cfg.star.profile)
    if len(profile.devices) != devices:
        raise ConfigError(f"star.profile: {cfg.star.profile} describes {len(profile.devices)} devices but the run "
                          f"has {devices} (WORLD_SIZE - 1)")
    sizes = parameter_counts(cfg.model.path, cfg.model.task, cfg.model.num_labels)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    act_bytes = tokens * sizes["hidden"] * 4
    memory = memory_model(cfg, cfg.data.batch_size)
    block_memory = memory.per_block(held=1)
    base_memory = memory.weights(0, embed=True, head=cfg.star.label_privacy)
    flops = 4 * sizes["block"] * tokens * cfg.star.local_steps
    problem = AllocationProblem(
        devices=tuple(DeviceProfile(block_time=flops / (d.gflops * 1e9), memory_budget=d.memory_mb * 2**20,
                                    base_memory=base_memory, act_bytes=act_bytes * cfg.star.local_steps)
                      for d in profile.devices),
        num_blocks=sizes["num_blocks"], block_memory=block_memory, uplink=profile.uplink_mbps * 1e6 / 8,
        downlink=profile.downlink_mbps * 1e6 / 8, server_block_time=flops / (profile.server_gflops * 1e9),
        error_budget=cfg.star.error_budget)
    if cfg.compress.bits == 0:
        result = allocate(problem)
        log.info("allocation: depths %s keep ratios %s predicted round delay %.2f s", list(result.depths),
                 [round(r, 3) for r in result.keep_ratios], result.round_delay)
        return result, None
    from . import calibrate

    try:
        dmax = max_depths(problem)
    except ValueError as e:
        raise ConfigError(f"star.profile: {e}") from None
    calibration = calibrate.measure(cfg, calibrate.cuts_to_measure(max(dmax)), calibrate.codec_menu(cfg))
    curves = [calibrate.device_curve(calibration, d, cfg.star.loss_budget) for d in dmax]
    weight = 1.0 / devices
    problem = dataclasses.replace(problem, error_budget=cfg.star.loss_budget, devices=tuple(
        dataclasses.replace(dev, err_weight=weight, err_curve=tuple((r, weight * e) for _, r, e in curve))
        for dev, curve in zip(problem.devices, curves)))
    result = snap_to_settings(problem, allocate(problem))
    settings = []
    for rho, curve in zip(result.keep_ratios, curves):
        # the setting the snapped ratio names (1.0: float32, what every curve implies)
        match = min(curve, key=lambda c: abs(c[1] - rho), default=None)
        settings.append((match[0], match[2]) if match and abs(match[1] - rho) < 1e-9 else (0, 0.0))
    log.info("allocation: depths %s bits %s (measured loss increase %s) predicted round delay %.2f s",
             list(result.depths), [b for b, _ in settings], [f"{e:+.2%}" for _, e in settings], result.round_delay)
    return result, settings


# ------------------------------------------------------------------------------------------------ start-up


def emulated_links(cfg: Config, devices: int):
    """star.emulate: (uplink delay, downlink delay) functions of a message's bytes, after checking that
    star.profile describes this run's devices."""
    profile = load_profile(cfg.star.profile)
    if len(profile.devices) != devices:
        raise ConfigError(f"star.profile: {cfg.star.profile} describes {len(profile.devices)} devices but the run "
                          f"has {devices}; star.emulate needs one profile entry per device (start "
                          f"{len(profile.devices) + 1} processes, or use another profile)")
    return (lambda n: profile.link_seconds(n, profile.uplink_mbps),
            lambda n: profile.link_seconds(n, profile.downlink_mbps))


def emulated_speed(cfg: Config, rank: int) -> float:
    """star.emulate: the extra sleep per second of compute of ``rank`` (0 = the server), from star.profile."""
    if not cfg.star.emulate:
        return 0.0
    profile = load_profile(cfg.star.profile)
    gflops = profile.server_gflops if rank == 0 else profile.devices[rank - 1].gflops
    return emulated_slowdown(profile.speed(gflops))


class StarJob:
    """A star run on this rank before its process group exists: the topology and (devices) the data and shard,
    every user mistake already checked."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.cfg = cfg
        self.topo = make_star_topology(cfg, rank, world_size)
        check_target_modules(cfg.adapter, cfg.model.path, cfg.model.task)
        self.is_lead = self.topo.is_server
        self.emulated = emulated_links(cfg, world_size - 1) if cfg.star.emulate else None
        self.data = self.shard = None
        if not self.topo.is_server:
            self.data = load_run_data(cfg, read_config(cfg.model.path).vocab_size)
            rows = shard_rows(self.data.train.groups, world_size - 1, cfg.star.split, cfg.star.alpha, cfg.run.seed,
                              cfg.data.batch_size)[rank - 1]
            self.shard = self.data.train.subset(rows, f"{self.data.train.name}:device{rank}")

    def build(self, refusal: ConfigError | None, resume_step: int, place: Placement = Placement()) -> Trainer:
        """Start-up: one process group per device link (every rank creates them all, in the same order), then
        this rank's role. The server tells the devices about a refusal in its first message."""
        cfg, topo = self.cfg, self.topo
        # A device idles through the other devices' turns, evaluations and checkpoints, so it waits for the server
        # DEVICE_PATIENCE times longer than the server waits for it (the server's own waits: run.timeout_s).
        device_wait_s = cfg.run.timeout_s * DEVICE_PATIENCE
        groups = {u: link_group([topo.server, u], device_wait_s) for u in topo.devices}
        codecs = _link_codecs(cfg, topo)

        # star.emulate: what reaches the server crossed the uplink, what reaches a device the downlink
        delay = self.emulated[0 if topo.is_server else 1] if self.emulated else None

        def link(u: int) -> Link:
            if topo.is_server:
                wire = Wire(topo.rank, place.device, group=groups[u], timeout_s=cfg.run.timeout_s,
                            deadline_s=cfg.run.timeout_s, link_delay=delay)
            else:
                wire = Wire(topo.rank, place.device, group=groups[u], timeout_s=device_wait_s, link_delay=delay)
            peer = u if topo.is_server else topo.server
            return Link(topo.rank, peer, wire, codecs[u], cfg.run.seed, at_server=topo.is_server,
                        dtype=base_dtype(cfg))

        if topo.is_server:
            return ServerTrainer(cfg, topo, {u: link(u) for u in topo.devices}, refusal, place.device)
        return DeviceTrainer(cfg, topo, link(topo.rank), self.data, self.shard, place.device)


# ------------------------------------------------------------------------------------------------------ devices


@dataclass
class DeviceTimes:
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    train_cpu_s: float = 0.0  # the process's CPU seconds over training steps


class DeviceTrainer(Trainer):
    """A device under the shared driver: embedding + blocks [0, d) + their LoRA (+ head and loss under label
    privacy) and its data shard. It does what the server's commands say, over its one link."""

    is_lead = False

    def __init__(self, cfg: Config, topo: StarTopology, link: Link, data, shard: Dataset,
                 device: torch.device = torch.device("cpu")):
        self.cfg, self.topo, self.link, self.shard, self.device = cfg, topo, link, shard, device
        self.mode, self.world_size = cfg.pipeline.mode, topo.world_size
        self.steps_per_unit = self.checkpoint_every = cfg.star.local_steps
        self.depth = topo.depth(topo.rank)
        self.privacy = cfg.star.label_privacy
        self.cut = load_model(cfg.model.path, cfg.model.task, cfg.model.num_labels, blocks=(0, self.depth),
                              embed=True, head=self.privacy, seed=cfg.run.seed, dtype=base_dtype(cfg))
        self.lora = add_adapters(self.cut, cfg.adapter, cfg.run.seed, base_dir=str(resolve_model_dir(cfg.model.path)))
        self.cut.model.to(device)
        self.adapter_config = self.lora.config_json
        self.optimizer = make_optimizer(cfg, self.lora)
        self.eval_batches = [b.to(device) for b in data.eval.eval_batches(cfg.data.batch_size, cfg.run.eval_batches)] \
            if data.eval else []
        self.has_eval = bool(self.eval_batches)
        self.eval_links = eval_links(cfg, topo)
        self.steps_done = 0  # the data position: this device's next batch
        self.times = DeviceTimes()
        self.last_bwd_s = 0.0
        self.slowdown = emulated_speed(cfg, topo.rank)  # star.emulate: this device's compute is stretched

    # -- driver verbs
    def start(self, resume) -> int | None:
        link = self.link
        link.follow([Msg("status", 0)])
        accepted, step = link.recv("status", 0)[0].tolist()
        if not accepted:
            raise ConfigError("the server refused to start this run (a resume that does not fit); its log names "
                              "the setting")
        link.follow(start_plan(step >= 0)[1:])
        sizes = [b.size for b in self.eval_batches]
        link.send("hello", 0, [torch.tensor([len(self.shard), len(sizes), *sizes], dtype=torch.int64)])
        link.send("view", 0, pack_state(self.lora.state_dict()))
        if step >= 0:
            state = unpack_state(link.recv("restore", 0))
            info = state.pop("info").tolist()
            self.steps_done, self.last_bwd_s = int(info[0]), info[1]
            checkpoint.load_adapter_tensors(state, self.lora, self.optimizer)
        link.flush()
        return step if step >= 0 else None

    def train_unit(self, round_index: int) -> UnitResult:
        link, local = self.link, self.cfg.star.local_steps
        steps = self._command(TRAIN, round_index)
        link.follow(round_plan(round_index, steps, local, self.privacy)[1:])
        skipped = sum(not self.train_step(round_index * local + k) for k in range(steps))
        if steps:
            state = checkpoint.adapter_tensors(self.lora, self.optimizer)
            state["info"] = torch.tensor([self.steps_done, skipped, self.last_bwd_s], dtype=torch.float64)
            link.send("device_state", round_index, pack_state(state))
        state = unpack_state(link.recv("global", round_index))
        stopped = bool(state.pop("info")[0])
        self.lora.load_state_dict(state)
        link.flush()
        # the server's verdict on the round: with optim.on_nonfinite=stop, the run ends after it on every rank
        return UnitResult(nonfinite=f"the server stopped the run in round {round_index} on a non-finite loss or "
                                    "gradient norm (its log names the step)" if stopped else None)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Forward only: this device's eval batches through its blocks and the server's (global) adapters, once
        per eval link (see :func:`eval_links`)."""
        link = self.link
        for mode in self.eval_links:
            evaluator = self._command(EVAL, -1, eval_link=EVAL_LINKS.index(mode))
            link.eval_codec = mode == CODEC
            link.follow(eval_plan(bool(evaluator), len(self.eval_batches), self.privacy)[1:])
            if evaluator:
                stats = [0.0, 0, 0]
                for j, batch in enumerate(self.eval_batches):
                    step = -1 - j
                    t0 = time.perf_counter()
                    hidden = self.lower_forward(batch, train=False)
                    self._emulate(t0)
                    self._send_activation(batch, step, hidden, 0.0)
                    if self.privacy:
                        top = link.recv("top", step)[0]
                        t1 = time.perf_counter()
                        _, s = self.head_loss(top, batch, train=False)
                        self._emulate(t1)
                        stats = [a + b for a, b in zip(stats, s)]
                link.send("eval_stats", -1, [torch.tensor(stats, dtype=torch.float64)])
            link.flush()
        return {}

    def state(self):
        return {}, {}

    def adapters(self) -> dict:
        return {}

    def finish(self) -> dict:
        self._command(STOP, -2)
        self.link.follow(stop_plan()[1:])
        self.link.send("row", -2, [rank_row(self._row(), self.link.wire.counters)])
        self.link.flush()
        return {}

    def _row(self) -> dict:
        return {"rank": self.topo.rank, "blocks": [0, self.depth], "fwd_s": self.times.fwd_s,
                "bwd_s": self.times.bwd_s, "train_cpu_s": self.times.train_cpu_s}

    def _command(self, expected: int, step: int, eval_link: int | None = None) -> int:
        """The server's next command, which the driver's lockstep predicts (an evaluation's link too); returns its
        argument."""
        self.link.follow([Msg("command", step)])
        command, arg, detail = self.link.recv("command", step)[0].tolist()
        if command != expected:
            raise ProtocolError(f"rank {self.topo.rank}: expected command {expected}, got {command}")
        if eval_link is not None and detail != eval_link:
            raise ProtocolError(f"rank {self.topo.rank}: expected an evaluation through the {EVAL_LINKS[eval_link]} "
                                f"link, the server's goes through link {detail}")
        return detail if command == TRAIN else arg

    # -- compute
    def lower_forward(self, batch: Batch, train: bool) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.cut.embed(batch.input_ids)
            ctx = self.cut.context(hidden, batch.attention_mask)
        # micro-batch 0 and the device's own step count: the seeds a single process would use for its batch
        return run_blocks(self.cut, 0, self.depth, hidden, ctx, frontier=0, grad=train, training=train,
                          seed=self.cfg.run.seed, step=self.steps_done, micro_batch=0,
                          dropout=self.cfg.adapter.dropout > 0)

    def _send_activation(self, batch: Batch, step: int, hidden: torch.Tensor, fwd_s: float) -> None:
        extra = [batch.attention_mask] if batch.attention_mask is not None else []
        # The device's own timings travel with the activation: the server's scheduler uses them next time.
        timing = torch.tensor([fwd_s, self.last_bwd_s], dtype=torch.float64)
        self.link.send("activation", step, [hidden, timing, *extra])
        if not self.privacy:
            self.link.send("labels", step, [batch.labels])

    def head_loss(self, top: torch.Tensor, batch: Batch, train: bool) -> tuple[torch.Tensor, list[float]]:
        """Label privacy: the device's own head and loss on the server's top hidden state."""
        top.requires_grad_(train)
        with torch.set_grad_enabled(train):
            total, correct = head_loss_sum(self.cut, top, batch.attention_mask, batch.labels)
        stats = [float(total.detach()), batch.count(), correct]
        if train:
            (total / batch.count()).backward()
            return top.grad, stats
        return None, stats

    def _emulate(self, started: float) -> None:
        """star.emulate: stretch the compute that began at ``started`` to this device's profile speed."""
        if self.slowdown:
            time.sleep((time.perf_counter() - started) * self.slowdown)

    def train_step(self, step: int) -> bool:
        """One local step; returns whether it updated the adapters (not when the server or this device found the
        loss or a gradient non-finite)."""
        cpu0 = time.process_time()
        _, batch = self.shard.batch_at(self.steps_done, self.cfg.data.batch_size, self.cfg.data.shuffle,
                                       self.cfg.run.seed + self.topo.rank)
        batch = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        hidden = self.lower_forward(batch, train=True)
        self._emulate(t0)
        fwd_s = time.perf_counter() - t0
        self._send_activation(batch, step, hidden, fwd_s)
        if self.privacy:
            top = self.link.recv("top", step)[0]
            t1 = time.perf_counter()
            grad_top, stats = self.head_loss(top, batch, train=True)
            self._emulate(t1)
            fwd_s += time.perf_counter() - t1
            self.link.send("top_gradient", step, [grad_top, torch.tensor(stats, dtype=torch.float64)])
        grad, skip = self.link.recv("gradient", step)
        t2 = time.perf_counter()
        updated = not bool(skip.item())
        if updated:
            hidden.backward(grad)
            local_sq = sum(float(p.grad.double().pow(2).sum()) for p in self.lora.trainable()
                           if p.grad is not None)
            updated = math.isfinite(local_sq)
            if updated:
                self.optimizer.step()
            else:
                log.warning("device %d: non-finite gradient norm at step %d; its update is skipped",
                            self.topo.rank, step)
                self.optimizer.zero_grad(set_to_none=True)
        self._emulate(t2)
        self.last_bwd_s = time.perf_counter() - t2
        self.times.fwd_s += fwd_s
        self.times.bwd_s += self.last_bwd_s
        self.steps_done += 1
        self.link.flush()  # the server has consumed this step's sends: release their buffers
        self.times.train_cpu_s += time.process_time() - cpu0
        return updated


@dataclass
class StepOutcome:
    """What one server step produced: the loss sum and targets over the devices that took part to its end."""

    loss_sum: float = 0.0
    count: int = 0
    devices: list[int] = field(default_factory=list)
    nonfinite: str | None = None


@dataclass
class ServerProfile:
    """Last measurements per device, for the scheduler and for client selection."""

    release: dict[int, float] = field(default_factory=dict)
    server: dict[int, float] = field(default_factory=dict)
    tail: dict[int, float] = field(default_factory=dict)
    step_time: dict[int, float] = field(default_factory=dict)


class Server:
    """The server's compute: the frozen base once (or a copy per device, star.server_copies), the LoRA sets, their
    optimizers, and the measurements its scheduler and client selection use. Knows no wire: links come in."""

    def __init__(self, cfg: Config, topo: StarTopology, device: torch.device = torch.device("cpu")):
        self.cfg, self.topo = cfg, topo
        self.rss_before_model = rss_bytes()  # the process (Python, torch, the wire) before the server's model
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
                              head=not self.privacy, seed=cfg.run.seed, dtype=base_dtype(cfg))

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
        for cut, _ in self.models.values():  # sets are drawn on the CPU, then everything moves
            cut.model.to(device)
        self.optimizers = {name: make_optimizer(cfg, a) for name, a in self.sets.items()}
        self.config_json = lora_config(cfg.adapter, cut, self.model_dir).to_dict()
        self.profile = ServerProfile()
        self.mobility = Mobility(cfg.star.mobility, cfg.star.dwell_mean)
        self.selector = Selector(cfg.star.selection, cfg.star.devices_per_round, seed=cfg.run.seed, c=cfg.star.ucb_c)
        self.rng = random.Random(cfg.run.seed)
        self.fwd_s = self.bwd_s = 0.0
        # star.emulate: the server's compute is stretched to its speed, and the scheduler's release and tail
        # times include the emulated links
        self.slowdown = emulated_speed(cfg, 0)
        self.link_s = emulated_links(cfg, topo.world_size - 1) if cfg.star.emulate else None
        self.device_loss: dict[int, float] = {}  # each device's last training loss (client selection)

    def _emulate(self, compute_s: float) -> None:
        """star.emulate: stretch ``compute_s`` seconds of the server's compute to its profile speed."""
        if self.slowdown:
            time.sleep(compute_s * self.slowdown)

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
                                seed=self.cfg.run.seed, step=step, dropout=self.cfg.adapter.dropout > 0,
                                recompute=self.cfg.star.recompute)
        pieces = torch.split(joined, [hiddens[i].shape[0] for i in members])
        tops = [None] * len(devices)
        for i, piece in zip(members, pieces):
            tops[i] = piece
        self.fwd_s += time.perf_counter() - t0
        return tops

    def _receive(self, link: Link, step: int, train: bool):
        tensors = link.recv("activation", step)
        hidden, timing = tensors[0], tensors[1]
        mask = tensors[2] if len(tensors) > 2 else None
        labels = None if self.privacy else link.recv("labels", step)[0]
        hidden.requires_grad_(train)
        return hidden, mask, labels, timing.tolist(), link.last_bytes

    def serve(self, devices: list[int], step: int, links: dict[int, Link], exchange) -> StepOutcome:
        """One step of ``devices`` as one batch through their server set and one optimizer step: sfl serves one
        device at a time, sft all of them together. ``exchange(u, step, action)`` guards every use of device u's
        link; a device lost on the way drops out of the step (in sft the others' step goes on without it).
        A non-finite loss or gradient norm updates nothing: the devices are told to skip the step too."""
        received = {}
        for u in devices:
            with exchange(u, step, "receiving the activation"):
                received[u] = self._receive(links[u], step, train=True)
        alive = [u for u in devices if u in received]
        if not alive:
            return StepOutcome()
        t0, computed = time.perf_counter(), self.fwd_s + self.bwd_s
        name = self.set_name(alive[0])
        self.activate(alive[0])
        hiddens, masks = [received[u][0] for u in alive], [received[u][1] for u in alive]
        labels = [received[u][2] for u in alive]
        if (self.sft and len(alive) > 1) or self.cfg.star.server_micro_batches > 1:
            outcome = self._device_by_device(alive, hiddens, masks, labels, step, links, exchange)
        else:
            tops = self._upper(alive, hiddens, masks, train=True, step=step)
            outcome = self._loss_and_backward(alive, hiddens, tops, masks, labels, step, links, exchange)
        sq = sum(float(p.grad.double().pow(2).sum()) for p in self.sets[name].trainable() if p.grad is not None)
        sq += sum(float(hiddens[alive.index(u)].grad.double().pow(2).sum()) for u in outcome.devices)
        if not (math.isfinite(outcome.loss_sum) and math.isfinite(sq)):
            who = ", ".join(f"device {u}" for u in outcome.devices)
            outcome.nonfinite = (f"non-finite loss ({outcome.loss_sum}) or gradient norm ({math.sqrt(sq)}) at step "
                                 f"{step} on the server ({who})")
        skip = torch.tensor([int(outcome.nonfinite is not None)], dtype=torch.int64)
        # its own compute only: under label privacy the step also waited for the devices' heads
        self._emulate(self.fwd_s + self.bwd_s - computed)
        for u in outcome.devices:
            with exchange(u, step, "sending the activation gradient"):
                links[u].send("gradient", step, [hiddens[alive.index(u)].grad, skip])
                release, tail = received[u][3]
                if self.link_s:
                    release += self.link_s[0](received[u][4])
                    tail += self.link_s[1](links[u].last_bytes)
                self.profile.release[u], self.profile.tail[u] = release, tail
        if outcome.nonfinite is None:
            self.optimizers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        for u in alive:
            self.profile.server[u] = elapsed / len(alive)
        for u in outcome.devices:
            with exchange(u, step, "sending the activation gradient"):
                links[u].flush()
        outcome.devices = [u for u in outcome.devices if u in links and not links[u].lost]
        return outcome

    def _device_by_device(self, devices, hiddens, masks, labels, step, links, exchange) -> StepOutcome:
        """sft: the shared set's gradient of sum_u w_u * loss_u (w_u = targets_u / targets) accumulated one
        device at a time, so that the server holds one device's activations at once (Note: sft memory); with
        star.server_micro_batches > 1 (sfl too), one piece of a device's rows at a time.

        Note (sft memory). Joined into one batch, every device's activations through the server's blocks (and
        their head's logits) are alive together until the backward: the sft server's peak RSS was 2.5x the
        sfl server's (README star bench). Summed device by device, the gradient is the same sum: each device's
        loss sum (or, under label privacy, its returned gradient scaled back to its loss sum) is
        back-propagated at once, and the set's gradients are divided by the step's targets at the end; the
        device's activation gradient is that of its own mean loss, as before."""
        cut = self.cut_for(devices[0])
        kept, counts, loss_value = [], {}, 0.0
        for i, u in enumerate(devices):
            if self.privacy:
                top = self._upper([u], [hiddens[i]], [masks[i]], train=True, step=step)[0]
                grad = None
                with exchange(u, step, "sending the top hidden state"):
                    links[u].send("top", step, [top])
                if not links[u].lost:
                    with exchange(u, step, "receiving the top gradient"):
                        grad, stats = links[u].recv("top_gradient", step)
                if grad is None:
                    continue  # lost on the way: the others' step goes on
                stats = stats.tolist()
                counts[u], loss_u = int(stats[1]), stats[0]
                t0 = time.perf_counter()
                torch.autograd.backward([top], [counts[u] * grad])  # the gradient of its loss sum
                self.bwd_s += time.perf_counter() - t0
                del top
            else:  # star.server_micro_batches pieces of rows, one piece's activations at a time
                pieces = self.cfg.star.server_micro_batches
                counts[u], loss_u = Batch(labels[i], labels[i]).count(), 0.0
                split = [torch.tensor_split(t, pieces) if t is not None else [None] * pieces
                         for t in (hiddens[i], masks[i], labels[i])]
                for hidden, mask, label in zip(*split):  # views: the gradient lands in hiddens[i].grad
                    top = self._upper([u], [hidden], [mask], train=True, step=step)[0]
                    t0 = time.perf_counter()  # the chunked head takes its gradient in its forward: both count here
                    loss, _ = head_loss_sum(cut, top, mask, label)
                    loss_u += float(loss.detach())
                    loss.backward()
                    self.bwd_s += time.perf_counter() - t0
                    del top, loss
            hiddens[i].grad.div_(max(counts[u], 1))  # the gradient of the device's own mean loss
            self.device_loss[u] = loss_u / max(counts[u], 1)
            loss_value += loss_u
            kept.append(u)
        if not kept:
            return StepOutcome()
        total = sum(counts.values())
        for p in self.sets[self.set_name(kept[0])].trainable():
            if p.grad is not None:
                p.grad.div_(total)
        return StepOutcome(loss_sum=loss_value, count=total, devices=kept)

    def _loss_and_backward(self, devices, hiddens, tops, masks, labels, step, links, exchange) -> StepOutcome:
        """Backward of sum_u w_u * loss_u (w_u = 1 in sfl; the share of targets in sft), then every device's
        activation gradient rescaled to that of its own mean loss."""
        if self.privacy:
            for u, top in zip(devices, tops):
                with exchange(u, step, "sending the top hidden state"):
                    links[u].send("top", step, [top])
            grads, stats = {}, {}
            for u in devices:
                if links[u].lost:
                    continue
                with exchange(u, step, "receiving the top gradient"):
                    g, s = links[u].recv("top_gradient", step)
                    grads[u], stats[u] = g, s.tolist()
            kept = [u for u in devices if u in grads]
            if not kept:
                return StepOutcome()
            counts = [int(stats[u][1]) for u in kept]
            total = sum(counts)
            for u in kept:
                self.device_loss[u] = stats[u][0] / max(stats[u][1], 1)
            weights = [c / total for c in counts] if self.sft else [1.0] * len(kept)
            t0 = time.perf_counter()
            torch.autograd.backward([tops[devices.index(u)] for u in kept],
                                    [w * grads[u] for w, u in zip(weights, kept)])
            self.bwd_s += time.perf_counter() - t0
            loss_value = sum(stats[u][0] for u in kept)
        else:
            kept = list(devices)
            counts = [Batch(lab, lab).count() for lab in labels]
            total = sum(counts)
            weights = [c / total for c in counts] if self.sft else [1.0] * len(devices)
            losses = []
            t0 = time.perf_counter()  # the chunked head takes its gradient in its forward: both count as backward
            for top, mask, lab, c in zip(tops, masks, labels, counts):
                losses.append(head_loss_sum(self.cut_for(devices[0]), top, mask, lab)[0])
            loss_value = float(sum(l.detach() for l in losses))
            for u, l, c in zip(devices, losses, counts):
                self.device_loss[u] = float(l.detach()) / max(c, 1)
            joint = sum(w * l / c for w, l, c in zip(weights, losses, counts))
            joint.backward()
            self.bwd_s += time.perf_counter() - t0
        for w, u in zip(weights, kept):
            if w != 1.0:
                hiddens[devices.index(u)].grad.div_(w)
        return StepOutcome(loss_sum=loss_value, count=total, devices=kept)

    @torch.no_grad()
    def evaluate(self, device: int, link: Link, batches: int) -> dict:
        """Forward only: ``device``'s eval batches through its blocks and the (global) server set."""
        loss, count, correct = 0.0, 0, 0
        self.activate(device)
        for j in range(batches):
            step = -1 - j
            hidden, mask, labels, _, _ = self._receive(link, step, train=False)
            t0 = time.perf_counter()
            top = self._upper([device], [hidden], [mask], train=False, step=step)[0]
            if self.privacy:
                self._emulate(time.perf_counter() - t0)
                link.send("top", step, [top])
            else:
                loss_total, hits = head_loss_sum(self.cut_for(device), top, mask, labels)
                loss += float(loss_total)
                count += Batch(labels, labels).count()
                correct += hits
                self._emulate(time.perf_counter() - t0)
        device_stats = link.recv("eval_stats", -1)[0].tolist()
        link.flush()
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
        return {"peak_rss_bytes": peak_rss_bytes(), "rss_before_model_bytes": self.rss_before_model,
                "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
                "optimizer_bytes": optim_bytes, "sets": len(self.sets),
                "copy_per_device_base_bytes": copies,
                "held_bytes": base_bytes + adapter_bytes + optim_bytes,
                "copy_per_device_bytes": copies + adapter_bytes + optim_bytes}


# ------------------------------------------------------------------------------------------- the server's driver


class ServerTrainer(Trainer):
    """The server under the shared driver: a unit is a round. It owns selection, ordering, aggregation and the
    checkpoints, and keeps going when a device's link fails (that device is lost for the rest of the run)."""

    is_lead = True

    def __init__(self, cfg: Config, topo: StarTopology, links: dict[int, Link], refusal: ConfigError | None,
                 device: torch.device = torch.device("cpu")):
        self.cfg, self.topo, self.links, self.refusal = cfg, topo, links, refusal
        self.mode, self.world_size = cfg.pipeline.mode, topo.world_size
        self.steps_per_unit = self.checkpoint_every = cfg.star.local_steps
        self.server = Server(cfg, topo, device)
        self.adapter_config = self.server.config_json
        self.live = set(topo.devices)
        self.lost: dict[int, dict] = {}  # device -> where and why its link failed
        self.lost_now: dict[int, str] = {}  # devices lost in the current round
        self.round = 0
        self.has_eval = False
        self.n_eval = 0
        self.eval_links = eval_links(cfg, topo)
        self.last_evals: dict[str, dict] = {}  # eval link -> record, of an evaluation after the last round
        self.shard_sizes: dict[int, float] = {}
        self.device_keys: dict[int, list[str]] = {}  # the adapter keys each device holds
        self.device_states: dict[int, dict] = {}  # each device's AdamW state and data position, last committed
        self.global_state: dict[str, torch.Tensor] = {}
        self.rounds_log: list[dict] = []
        self.train_cpu_s = 0.0
        self.committed: tuple[dict, dict] = ({}, {})

    # -- links
    @contextmanager
    def _exchange(self, device: int, step: int, action: str):
        """Run a use of ``device``'s link; if the link fails, the device is lost (and the block is left)."""
        try:
            yield
        except PeerError as e:
            self._lose(device, step, action, e)

    def _lose(self, device: int, step: int, action: str, error: Exception) -> None:
        link = self.links[device]
        link.lost = True
        link.wire.abandon()
        self.live.discard(device)
        self.lost[device] = {"round": self.round, "step": step, "action": action, "error": str(error),
                             "time": time.time()}
        self.lost_now[device] = f"{action} at step {step}: {error}"
        log.warning("device %d lost in round %d (step %d, %s); the run goes on with devices %s: %s", device,
                    self.round, step, action, sorted(self.live), error)

    def _send_all(self, plans: dict[int, list[Msg]], name: str, step: int, values: dict[int, list[int]]) -> None:
        for u in sorted(self.live):
            with self._exchange(u, step, f"sending the {name}"):
                self.links[u].follow(plans[u])
                self.links[u].send(name, step, [torch.tensor(values[u], dtype=torch.int64)])

    # -- driver verbs
    def start(self, resume) -> int | None:
        srv = self.server
        step = resume[0] if resume is not None and self.refusal is None else -1
        plans = {u: start_plan(step >= 0) for u in self.live}
        self._send_all(plans, "status", 0, {u: [int(self.refusal is None), step] for u in self.live})
        if self.refusal is not None:
            for u in sorted(self.live):
                with self._exchange(u, 0, "refusing the run"):
                    self.links[u].flush()
            raise self.refusal
        views = {}
        for u in sorted(self.live):
            with self._exchange(u, 0, "receiving the device's hello"):
                hello = self.links[u].recv("hello", 0)[0].tolist()
                views[u] = unpack_state(self.links[u].recv("view", 0))
                self.shard_sizes[u], self.n_eval = float(hello[0]), hello[1]
                self.device_keys[u] = sorted(views[u])
        self.has_eval = self.n_eval > 0
        if step >= 0:
            self._restore(*resume[1:])
            for u in sorted(self.live):
                with self._exchange(u, 0, "restoring the device"):
                    self.links[u].send("restore", 0, pack_state(self._device_restore(u)))
        else:
            self.global_state = srv.global_state(views, sorted(views), self.shard_sizes)
            self._commit()
        for u in sorted(self.live):
            with self._exchange(u, 0, "starting"):
                self.links[u].flush()
        return step if step >= 0 else None

    def train_unit(self, t: int) -> UnitResult:
        cfg, srv, star, topo = self.cfg, self.server, self.cfg.star, self.topo
        L, local = topo.num_blocks, star.local_steps
        self.round, self.lost_now, self.last_evals = t, {}, {}
        cpu0 = time.process_time()
        live = sorted(self.live)
        selected = srv.selector.select(t, live) if live else []
        dwell = srv.mobility.dwell_times(srv.rng, selected)
        plan = {u: steps_before_leaving(dwell[u], srv.profile.step_time.get(u, 0.0), local) for u in selected}
        self._send_all({u: round_plan(t, plan.get(u, 0), local, srv.privacy) for u in live}, "command", t,
                       {u: [TRAIN, t, plan.get(u, 0)] for u in live})
        round_start = time.perf_counter()
        records, tokens, loss, nonfinite = [], 0, None, None
        for k in range(local):
            step = t * local + k
            active = [u for u in selected if plan[u] > k and u in self.live]
            t0 = time.perf_counter()
            record = {"step": step, "round": t, "devices": active, "trainable_blocks": L, "loss": None}
            if active:
                if srv.sft:
                    order, outcomes = active, [srv.serve(active, step, self.links, self._exchange)]
                else:
                    prof = srv.profile
                    times = [[prof.release.get(u, 0.0) for u in active], [prof.server.get(u, 0.0) for u in active],
                             [prof.tail.get(u, 0.0) for u in active]]
                    order_idx = server_order(star.schedule, *times)
                    order = [active[i] for i in order_idx]
                    outcomes = [srv.serve([u], step, self.links, self._exchange) for u in order]
                    record["predicted_makespan_s"] = makespan(order_idx, *times)
                    record["fifo_makespan_s"] = makespan(server_order("fifo", *times), *times)
                served = [u for o in outcomes for u in o.devices]
                bad = [o.nonfinite for o in outcomes if o.nonfinite]
                count = sum(o.count for o in outcomes)
                step_loss = sum(o.loss_sum for o in outcomes) / max(count, 1)
                record.update({"order": order, "step_s": time.perf_counter() - t0, "served": served})
                if bad:
                    nonfinite = nonfinite or bad[0]
                    record.update({"skipped": True, "nonfinite": bad[0]})
                elif served:
                    record["loss"] = loss = step_loss
                tokens += len(served) * cfg.data.batch_size * cfg.data.seq_len
            records.append(record)
        round_s = time.perf_counter() - round_start
        for u in selected:
            if plan[u] and u in self.live:
                # the round's time over its step slots: a device that left early is not charged for the slots
                # it missed (that would make it look slower and leave sooner next time)
                srv.profile.step_time[u] = round_s / local
        views, states = {}, {}
        for u in selected:
            if plan[u] and u in self.live:
                with self._exchange(u, t, "receiving the device's adapters"):
                    state = unpack_state(self.links[u].recv("device_state", t))
                    info = state.pop("info").tolist()
                    views[u] = {k: v for k, v in state.items() if not k.startswith("optim/")}
                    states[u] = {"optim": {k: v for k, v in state.items() if k.startswith("optim/")},
                                 "steps_done": int(info[0]), "last_bwd_s": info[2]}
                    if info[1]:
                        nonfinite = nonfinite or f"non-finite gradient norm on device {u} in round {t}"
        # until every device's last backward is done and its adapters are here: the round's makespan
        trained_s = time.perf_counter() - round_start
        commit = not (nonfinite and cfg.optim.on_nonfinite == "stop")
        finished = [u for u in selected if plan[u] == local and u in views]
        dropped = [u for u in selected if plan[u] < local]
        skipped = len(finished) < star.min_devices
        if commit and not skipped:
            self.global_state = srv.global_state(views, finished, self.shard_sizes)
        srv.load_global(self.global_state)
        for u in sorted(self.live):
            with self._exchange(u, t, "sending the global adapter"):
                verdict = torch.tensor([int(not commit)])
                self.links[u].send("global", t, pack_state({**self._device_part(u), "info": verdict}))
                self.links[u].flush()
        for u in selected:
            prof = srv.profile
            delay = prof.release.get(u, 0.0) + prof.server.get(u, 0.0) + prof.tail.get(u, 0.0)
            srv.selector.record(u, u in finished, srv.device_loss.get(u), delay or None)
        round_info = {"round_selected": selected, "round_finished": finished, "round_dropped": dropped,
                      "round_skipped": skipped, "round_s": round_s, "round_trained_s": trained_s,
                      **({"round_lost": {str(u): why for u, why in self.lost_now.items()}} if self.lost_now else {})}
        records[-1].update(round_info)
        if star.mobility != "none" or skipped or self.lost_now:
            log.info("round %d: selected %s finished %s dropped %s lost %s%s", t, selected, finished, dropped,
                     sorted(self.lost_now), " (skipped: fewer than star.min_devices)" if skipped else "")
        self.train_cpu_s += time.process_time() - cpu0
        if commit:
            self.rounds_log.append(round_info)
            self.device_states.update(states)
            self._commit()
            save_adapters(Path(cfg.run.out_dir) / "rounds" / f"round_{t:04d}", self.global_state, self.adapter_config)
        for r in records:
            r["note"] = f"round {t + 1}/{star.rounds} devices {selected}"
        return UnitResult(records=records, tokens=tokens, loss=loss, nonfinite=nonfinite)

    def evaluate(self) -> dict:
        """The record of compress.eval's link; with a lossy codec also the other link's, its keys suffixed with
        the link's name (eval_loss_codec, ...)."""
        records = {}
        for mode in self.eval_links:
            live = sorted(self.live)
            evaluator = live[0] if live else None
            plans = {u: eval_plan(u == evaluator, self.n_eval, self.server.privacy) for u in live}
            self._send_all(plans, "command", -1, {u: [EVAL, int(u == evaluator), EVAL_LINKS.index(mode)]
                                                  for u in live})
            for u in live:
                if u != evaluator:
                    with self._exchange(u, -1, "evaluating"):
                        self.links[u].flush()
            if evaluator is None or evaluator not in self.live:
                log.error("no device to evaluate with (lost: %s)", sorted(self.lost))
                continue
            for link in self.links.values():
                link.eval_codec = mode == CODEC
            with self._exchange(evaluator, -1, "evaluating"):  # the evaluator may be lost on the way
                records[mode] = self.server.evaluate(evaluator, self.links[evaluator], self.n_eval)
        self.last_evals = records
        head = records.get(self.eval_links[0], {})
        if len(self.eval_links) == 1 or not head:
            return head
        out = {**head, "eval_link": self.eval_links[0]}
        for mode in self.eval_links[1:]:
            out.update({f"{k}_{mode}": v for k, v in records.get(mode, {}).items()})
        return out

    def state(self) -> tuple[dict, dict]:
        return self.committed

    def adapters(self) -> dict[str, torch.Tensor]:
        return self.global_state

    def finish(self) -> dict:
        cfg, srv, topo = self.cfg, self.server, self.topo
        own = {"rank": topo.server, "blocks": [min(topo.depths), topo.num_blocks], "fwd_s": srv.fwd_s,
               "bwd_s": srv.bwd_s, "train_cpu_s": self.train_cpu_s}
        rows = {topo.server: decode_row(rank_row(own, Counters.total(link.wire.counters for link in self.links.values())),
                              list(own))}
        self._send_all({u: stop_plan() for u in self.live}, "command", -2, {u: [STOP, 0, 0] for u in self.live})
        for u in sorted(self.live):
            with self._exchange(u, -2, "receiving the device's summary row"):
                rows[u] = decode_row(self.links[u].recv("row", -2)[0], list(own))
                self.links[u].flush()
        for u in topo.devices:
            if u not in rows:  # what the server knows of a lost device
                rows[u] = {"rank": u, "blocks": [0, topo.depth(u)], "lost": self.lost[u]}
        ranks = [rows[r] for r in range(topo.world_size)]
        return {
            "rounds": cfg.star.rounds, "num_blocks": topo.num_blocks, "device_blocks": topo.depths,
            "compress": {**dataclasses.asdict(cfg.compress), "eval_links": self.eval_links,
                         "smashed": smashed_summary(list(self.links.values()))},
            **({f"eval_after_{mode}": record for mode, record in self.last_evals.items()}
               if len(self.eval_links) > 1 else {}),
            **({"allocation": topo.allocation} if topo.allocation else {}),
            "bytes_on_wire": sum(r.get("bytes_sent", 0) for r in ranks), "server": srv.memory_report(),
            "ranks": ranks, "rounds_log": self.rounds_log, "lost_devices": {str(u): v for u, v in self.lost.items()}}

    # -- state
    def _device_part(self, device: int) -> dict[str, torch.Tensor]:
        return {k: self.global_state[k] for k in self.device_keys[device] if k in self.global_state}

    def _device_restore(self, device: int) -> dict[str, torch.Tensor]:
        state = self.device_states.get(device, {"optim": {}, "steps_done": 0, "last_bwd_s": 0.0})
        return {**self._device_part(device), **state["optim"],
                "info": torch.tensor([state["steps_done"], state["last_bwd_s"]], dtype=torch.float64)}

    def _commit(self) -> None:
        """Snapshot what a checkpoint after this round holds (Note: checkpoint layout in checkpoint.py): the
        global adapter, every server set's and device's AdamW state, and the JSON state of selection, mobility
        and scheduling. Server sets and devices hold the global adapter itself after the round."""
        srv = self.server
        tensors = {k: v.clone() for k, v in self.global_state.items()}
        for name, adapters in srv.sets.items():
            tensors.update({k: v.clone() for k, v in checkpoint.optimizer_tensors(
                adapters, srv.optimizers[name], prefix=f"server/{name}/").items()})
        for u, st in self.device_states.items():
            tensors.update({f"devices/{u}/{k}": v for k, v in st["optim"].items()})
        state = {
            "selector": {str(u): vars(s).copy() for u, s in srv.selector.stats.items()},
            "rng": [srv.rng.getstate()[0], list(srv.rng.getstate()[1]), srv.rng.getstate()[2]],
            "profile": {name: {str(u): v for u, v in getattr(srv.profile, name).items()}
                        for name in ("release", "server", "tail", "step_time")},
            "device_loss": {str(u): v for u, v in srv.device_loss.items()},
            "devices": {str(u): {"steps_done": st["steps_done"], "last_bwd_s": st["last_bwd_s"]}
                        for u, st in self.device_states.items()},
            "rounds_log": self.rounds_log}
        self.committed = (tensors, state)

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        srv = self.server
        self.global_state = {k: v for k, v in tensors.items() if not k.startswith(("server/", "devices/"))}
        srv.load_global(self.global_state)
        for name, adapters in srv.sets.items():
            checkpoint.load_optimizer_tensors(tensors, adapters, srv.optimizers[name], prefix=f"server/{name}/")
        for u, info in state["devices"].items():
            prefix = f"devices/{u}/"
            self.device_states[int(u)] = {"optim": {k[len(prefix):]: v for k, v in tensors.items()
                                                    if k.startswith(prefix)}, **info}
        srv.selector.stats = {int(u): DeviceStats(**s) for u, s in state["selector"].items()}
        version, internal, gauss = state["rng"]
        srv.rng.setstate((version, tuple(internal), gauss))
        for name, values in state["profile"].items():
            setattr(srv.profile, name, {int(u): v for u, v in values.items()})
        srv.device_loss = {int(u): v for u, v in state["device_loss"].items()}
        self.rounds_log = list(state["rounds_log"])
        self._commit()


