"""The one module that calls torch.distributed point-to-point: process groups, a tensor-only wire, byte counters.

Wire format (Note: wire format). A message is a fixed int64 header followed by its payload tensors:

    header = [MAGIC, kind, step, micro_batch, n_tensors, sent_ns, (dtype, ndim, d0, d1, d2, d3) * MAX_TENSORS]

Every (src, dst) pair is a FIFO channel: messages are received in the order they were sent, and both ends take
that order from the same plan (``schedule.build_schedule`` checks it for every channel; a star link's plan is
checked as it passes). The receiver reads the header, checks it names the message it expects (kind, step,
micro-batch; a mismatch is an ordering bug and an error), allocates the payload from it and receives it. No
tags and no receives posted ahead, which is exactly what NCCL requires, so the CPU suite on gloo exercises the
order NCCL needs. No pickle, no object collectives: names (e.g. adapter keys) travel as uint8 tensors.

Transports. Headers always travel on a gloo group (CPU). Payloads: on gloo too, as CPU tensors; when ranks
compute on CUDA over gloo (several ranks sharing a GPU), through pinned host buffers; with NCCL (a GPU per rank)
on two NCCL groups, one per direction (Note: NCCL channels). Sends never block the caller: their works are kept
and waited for in ``flush``, which keeps the send buffers alive until then. Batched P2P (batch_isend_irecv) is
avoided on purpose (a history of hangs on gloo).

Note (NCCL channels): NCCL puts both directions between two ranks on one stream, so a rank that sends to its
neighbour while the neighbour sends to it can wait forever for a receive queued behind the other's send. With
one group for messages to a higher rank and one for messages to a lower rank, each pair's stream in a group
carries one direction only, and FIFO channels are all that is needed.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MAGIC = 0x52494E47  # "RING"
MAX_TENSORS = 3
HEADER_LEN = 6 + 6 * MAX_TENSORS
HEADER_BYTES = HEADER_LEN * 8

# Message kinds (named in the header and in the byte counters).
ACT, GRAD, LABELS, ADAPTERS, TOP, TOP_GRAD, CONTROL, CHECKPOINT, STATS, END = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
EVAL_ACT, EVAL_TOP = 11, 12  # a star evaluation's hidden states, counted apart from training's smashed data
KIND_NAMES = {ACT: "activation", GRAD: "gradient", LABELS: "labels", ADAPTERS: "adapters", TOP: "top_hidden",
              TOP_GRAD: "top_gradient", CONTROL: "control", CHECKPOINT: "checkpoint", STATS: "stats",
              END: "end", EVAL_ACT: "eval_activation", EVAL_TOP: "eval_top_hidden"}

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool,
           torch.float64]
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


def encode_header(kind: int, step: int, micro_batch: int, tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a message carries at most {MAX_TENSORS} tensors, got {len(tensors)}")
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    # The send time lets a receiver on the same box emulate a slower link (see Wire.link_delay).
    header[:6] = torch.tensor([MAGIC, kind, step, micro_batch, len(tensors), time.time_ns()])
    for i, t in enumerate(tensors):
        if t.dim() > 4:
            raise ValueError(f"tensor {i} has {t.dim()} dims; the wire format carries at most 4")
        shape = list(t.shape) + [0] * (4 - t.dim())
        header[6 + 6 * i: 12 + 6 * i] = torch.tensor([_DTYPE_CODE[t.dtype], t.dim(), *shape])
    return header


def decode_header(header: torch.Tensor) -> tuple[int, int, int, list[tuple[torch.dtype, tuple[int, ...]]]]:
    values = header.tolist()
    if values[0] != MAGIC:
        raise RuntimeError(f"corrupt message header (magic {values[0]:#x})")
    kind, step, micro_batch, count = values[1:5]
    specs = []
    for i in range(count):
        code, ndim, *shape = values[6 + 6 * i: 12 + 6 * i]
        specs.append((_DTYPES[code], tuple(shape[:ndim])))
    return kind, step, micro_batch, specs


def payload_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------ process groups, errors


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def start_world(rank: int, world_size: int, timeout_s: float, backend: str = "gloo"):
    """Join the default process group (gloo: collectives on CPU tensors and message headers), every wait bounded
    by ``timeout_s`` (Note: restart store). With ``backend="nccl"`` also create the two NCCL groups that carry
    payloads and return them (up, down); else None.

    Note (restart store): under torchrun the workers share the agent's TCPStore, and a static or c10d
    rendezvous keeps that store across ``--max-restarts`` restarts. torch 2.13 gives the workers no per-attempt
    prefix, so a restarted rank read its peers' gloo addresses of the attempt before and connected to ports that
    no longer listen (connection refused, or a wait with no deadline). Every attempt gets its own key space here.
    """
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    if addr in LOOPBACK:
        # One box: keep gloo's listening sockets on loopback unless the user chose an interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=timeout_s)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, world_size, is_master=not agent_store and rank == 0, timeout=timeout,
                          multi_tenant=True)
    attempt = f"ringada/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/" \
              f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    dist.init_process_group("gloo", store=dist.PrefixStore(attempt, store), rank=rank, world_size=world_size,
                            timeout=timeout)
    if backend == "nccl":  # payloads only, one group per direction (Note: NCCL channels)
        return dist.new_group(backend="nccl", timeout=timeout), dist.new_group(backend="nccl", timeout=timeout)
    return None


@dataclass(frozen=True)
class Placement:
    """Where this rank computes and what carries its payloads (NCCL groups up/down, or None: the gloo group)."""

    device: torch.device = torch.device("cpu")
    data_groups: tuple | None = None


def link_group(members: list[int], timeout_s: float):
    """A process group of ``members`` only (every rank of the world must call this, in the same order), whose
    failures stay inside it: a star keeps one per device so that a lost device breaks nothing else.
    ``timeout_s`` bounds its waits (the server bounds its own more tightly with ``Wire(deadline_s=...)``)."""
    return dist.new_group(members, timeout=timedelta(seconds=timeout_s))


class ProtocolError(RuntimeError):
    """The two ends of a channel disagree about what comes next (a bug, never a failure of the peer)."""


class PeerError(RuntimeError):
    """An exchange with another rank failed or ran past run.timeout_s: names this rank, the peer, the step and
    the action."""

    def __init__(self, rank: int, peer: int | str, step: int, action: str, cause: BaseException | str,
                 timeout_s: float | None = None):
        self.rank, self.peer, self.step, self.action = rank, peer, step, action
        text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        timed_out = "timed out" in text.lower() or "timeout" in text.lower()
        if timed_out:
            hint = (f"no answer within run.timeout_s={timeout_s:g} s; raise it if a step is really that slow"
                    if timeout_s else "no answer in time")
        else:
            hint = "the peer's process or box is gone"
        self.timed_out = timed_out
        who = f"rank {peer}" if peer != "any" else "the other ranks (a collective: gloo does not say which)"
        super().__init__(f"rank {rank}: {action} with {who} at step {step} failed ({hint}): {text}")


@contextmanager
def collective(rank: int, action: str, step: int, timeout_s: float | None = None):
    """Re-raise a failed collective as a PeerError naming this rank, the step and the action."""
    try:
        yield
    except PeerError:
        raise
    except RuntimeError as e:
        raise PeerError(rank, "any", step, action, e, timeout_s) from e


@dataclass
class Counters:
    bytes_sent: int = 0
    bytes_recv: int = 0
    messages_sent: int = 0
    messages_recv: int = 0
    wait_s: float = 0.0  # time blocked waiting for data to arrive, or for a peer to take what was sent
    sent_by_kind: dict = field(default_factory=dict)  # kind name -> [messages, bytes]
    recv_by_kind: dict = field(default_factory=dict)

    @classmethod
    def total(cls, parts) -> Counters:
        """The sum of several links' counters (a star server's)."""
        out = cls()
        for c in parts:
            out.bytes_sent += c.bytes_sent
            out.bytes_recv += c.bytes_recv
            out.messages_sent += c.messages_sent
            out.messages_recv += c.messages_recv
            out.wait_s += c.wait_s
            for mine, theirs in ((out.sent_by_kind, c.sent_by_kind), (out.recv_by_kind, c.recv_by_kind)):
                for kind, (messages, nbytes) in theirs.items():
                    entry = mine.setdefault(kind, [0, 0])
                    entry[0] += messages
                    entry[1] += nbytes
        return out

    def add(self, direction: str, kind: int, nbytes: int) -> None:
        table = self.sent_by_kind if direction == "sent" else self.recv_by_kind
        entry = table.setdefault(KIND_NAMES[kind], [0, 0])
        entry[0] += 1
        entry[1] += nbytes
        if direction == "sent":
            self.bytes_sent += nbytes
            self.messages_sent += 1
        else:
            self.bytes_recv += nbytes
            self.messages_recv += 1


@dataclass(frozen=True, eq=False)
class _Held:
    """One tensor of a message in flight: its buffer stays alive until the send has been waited on."""

    work: object
    buffer: torch.Tensor
    dst: int
    kind: int
    step: int
    micro_batch: int


class Wire:
    """Point-to-point messages of one rank, every (src, dst) channel in sending order (Note: wire format).
    ``sent_log`` records (kind, dst, step, mb) of every send; ``held_peak_bytes`` is the most bytes of sent
    messages held at once, waiting to be released (:meth:`flush`, :meth:`release`)."""

    def __init__(self, rank: int, device: torch.device | None = None, *, group=None, data_groups=None,
                 timeout_s: float | None = None, deadline_s: float | None = None, log_messages: bool = False,
                 link_delay=None):
        """``group``: the gloo group headers travel in (default: the world), payloads too unless ``data_groups``
        (NCCL: one group per direction, see Note: NCCL channels) carry them. With CUDA compute and no data
        groups, payloads are staged through pinned host memory. ``timeout_s`` only words errors (the groups' own
        timeouts bound every wait, unless ``deadline_s`` bounds this end's waits more tightly: a star server gives
        up on a device sooner than the device, idle through other devices' turns, gives up on the server).
        ``link_delay(nbytes) -> seconds``, when given, holds every received message
        until its send time plus that delay (link emulation on one box: both ends share the clock)."""
        self.rank = rank
        self.device = device or torch.device("cpu")
        self.group, self.data_groups, self.timeout_s, self.deadline_s = group, data_groups, timeout_s, deadline_s
        self.staged = self.device.type == "cuda" and data_groups is None
        self.link_delay = link_delay
        self.counters = Counters()
        self.log_messages = log_messages
        self.sent_log: list[tuple[int, int, int, int]] = []
        self._pending_sends: list[_Held] = []
        self._held_bytes = 0
        self.held_peak_bytes = 0

    def _payload_group(self, src: int, dst: int):
        if self.data_groups is None:
            return self.group
        return self.data_groups[0] if src < dst else self.data_groups[1]

    # -- sending
    def send(self, dst: int, kind: int, step: int, micro_batch: int, tensors: list[torch.Tensor]) -> None:
        """Queue one message; never blocks (the buffers stay alive until ``flush``)."""
        assert dst != self.rank, "a rank never sends to itself"
        tensors = [t.detach().contiguous() for t in tensors]
        header = encode_header(kind, step, micro_batch, tensors)
        if self.staged:
            # gloo reads host memory: copy to pinned buffers (all copies in flight at once), then wait for them
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            tensors = host
        elif self.data_groups is not None:
            tensors = [t.to(self.device) for t in tensors]  # NCCL moves CUDA tensors only (names, shapes too)
        try:
            self._pending_sends.append(_Held(dist.isend(header, dst, group=self.group), header, dst, kind, step,
                                             micro_batch))
            payload = self._payload_group(self.rank, dst)
            for t in tensors:
                self._pending_sends.append(_Held(dist.isend(t, dst, group=payload), t, dst, kind, step, micro_batch))
        except RuntimeError as e:
            raise self._error(dst, step, f"sending {KIND_NAMES[kind]} (mb {micro_batch})", e) from e
        nbytes = HEADER_BYTES + payload_bytes(tensors)
        self._held_bytes += nbytes
        self.held_peak_bytes = max(self.held_peak_bytes, self._held_bytes)
        self.counters.add("sent", kind, nbytes)
        if self.log_messages:
            self.sent_log.append((kind, dst, step, micro_batch))

    # -- receiving
    def recv(self, src: int, kind: int, step: int, micro_batch: int) -> list[torch.Tensor]:
        """The next message of the channel from ``src``, which must be the one named (else an error: the two
        ends disagree about the order)."""
        return self.recv_either(src, (kind,), step, micro_batch)[1]

    def recv_either(self, src: int, kinds: tuple[int, ...], step: int, micro_batch: int
                    ) -> tuple[int, list[torch.Tensor]]:
        """Like :meth:`recv`, where the plan allows one of several kinds at this point (e.g. a decoding pass or
        the END that replaces it); returns (kind, tensors)."""
        t0 = time.perf_counter()
        action = f"receiving {KIND_NAMES[kinds[0]]} (mb {micro_batch})"
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        try:
            self._wait(dist.irecv(header, src, group=self.group))
        except RuntimeError as e:
            raise self._error(src, step, action, e) from e
        got_kind, got_step, got_mb, specs = decode_header(header)
        if got_kind not in kinds or (got_step, got_mb) != (step, micro_batch):  # a bug, not a failure of the peer
            expected = " or ".join(KIND_NAMES[k] for k in kinds)
            raise ProtocolError(f"rank {self.rank}: expected {expected} of step {step} mb {micro_batch} "
                                f"from rank {src}, got {KIND_NAMES.get(got_kind, got_kind)} of step {got_step} "
                                f"mb {got_mb}")
        kind = got_kind
        try:
            on_gpu = self.data_groups is not None
            tensors = [torch.empty(shape, dtype=dtype, device=self.device if on_gpu else "cpu",
                                   pin_memory=self.staged) for dtype, shape in specs]
            payload = self._payload_group(src, self.rank)
            works = [dist.irecv(t, src, group=payload) for t in tensors]
            for w in works:
                self._wait(w)
        except RuntimeError as e:
            raise self._error(src, step, action, e) from e
        nbytes = HEADER_BYTES + payload_bytes(tensors)
        if self.staged:
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        if self.link_delay is not None:
            hold = int(header[5]) / 1e9 + self.link_delay(nbytes) - time.time()
            if hold > 0:
                time.sleep(hold)
        self.counters.wait_s += time.perf_counter() - t0
        self.counters.add("recv", kind, nbytes)
        return kind, tensors

    def flush(self) -> None:
        """Wait for every outstanding send (their buffers are kept alive until here); the time a peer takes to
        receive them counts as waiting."""
        pending, self._pending_sends = self._pending_sends, []
        t0 = time.perf_counter()
        self._settle(pending)
        self.counters.wait_s += time.perf_counter() - t0

    def release(self, micro_batch: int, before_step: int) -> None:
        """Release the sends of ``micro_batch`` from steps before ``before_step``, which the caller knows were
        taken: a later message of that micro-batch has come back round after them (decoding's passes). Waiting
        on them returns at once, and it is needed: gloo tells a send is done only once it is waited on, so a
        long stream of messages would otherwise hold every buffer until one ``flush`` at the end."""
        done = [h for h in self._pending_sends if h.micro_batch == micro_batch and h.step < before_step]
        if done:
            self._pending_sends = [h for h in self._pending_sends
                                   if not (h.micro_batch == micro_batch and h.step < before_step)]
            self._settle(done)

    def _settle(self, held: list[_Held]) -> None:
        for h in held:
            try:
                self._wait(h.work)
            except RuntimeError as e:
                raise self._error(h.dst, h.step, f"sending {KIND_NAMES[h.kind]}", e) from e
            self._held_bytes -= h.buffer.numel() * h.buffer.element_size()

    def abandon(self) -> None:
        """Forget every outstanding send (the peer is gone; nothing will complete)."""
        self._pending_sends.clear()
        self._held_bytes = 0

    def _wait(self, work) -> None:
        if self.deadline_s is None:
            work.wait()  # bounded by the group's timeout
        else:
            work.wait(timedelta(seconds=self.deadline_s))

    def _error(self, peer: int, step: int, action: str, cause: BaseException) -> PeerError:
        return PeerError(self.rank, peer, step, action, cause, self.timeout_s)


def encode_names(names: list[str]) -> torch.Tensor:
    data = "\n".join(names).encode()
    return torch.tensor(list(data), dtype=torch.uint8)


def decode_names(data: torch.Tensor) -> list[str]:
    text = bytes(data.tolist()).decode()
    return text.split("\n") if text else []


def pack_state(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """A name -> tensor dict as three tensors: names (uint8), shapes (int64: ndim, dims...), values (fp32)."""
    keys = sorted(state)
    shapes = []
    for k in keys:
        shapes += [state[k].dim(), *state[k].shape]
    # on the CPU: a state may mix devices (AdamW keeps its step count on the CPU, its moments with the parameter)
    values = torch.cat([state[k].detach().float().cpu().reshape(-1) for k in keys]) if keys else torch.zeros(0)
    return [encode_names(keys), torch.tensor(shapes, dtype=torch.int64), values]


def unpack_state(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    names_t, shapes_t, values = tensors
    keys, shapes, out, i, offset = decode_names(names_t), shapes_t.tolist(), {}, 0, 0
    for key in keys:
        ndim = shapes[i]
        shape = shapes[i + 1:i + 1 + ndim]
        i += 1 + ndim
        n = 1
        for d in shape:
            n *= d
        out[key] = values[offset:offset + n].reshape(shape).clone()
        offset += n
    return out
