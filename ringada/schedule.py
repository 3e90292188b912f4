"""Pipeline schedules as data.

A schedule is a list of small :class:`Action` records per rank.  The lists are
built by pure functions, checked by :meth:`Plan.validate`, timed by
:func:`simulate` and printed by :meth:`Plan.format`; a runtime executes them
literally, one action after the other.

Stage model
-----------
The model has ``L`` transformer blocks ``0 .. L-1`` (bottom to top) split over
``N`` ranks by ``blocks_per_rank``: rank ``r`` holds the consecutive range
``[lo_r, hi_r)``.  Any rank may hold zero blocks.

* ``line``: the classic pipeline.  ``S = N`` stages, stage ``k`` runs on rank
  ``k``; stage 0 also owns the embedding and stage ``N-1`` the final norm, the
  head and the loss.  ``N = 1`` is a single stage holding everything.
* ``ring``: rank 0 is the *initiator*: it owns both the embedding (bottom) and
  the final norm + head + loss (top).  ``S = N + 1`` virtual stages: stage 0 is
  rank 0 (embedding + rank 0's blocks), stage ``k`` is rank ``k`` for
  ``k = 1 .. N-1``, and stage ``N`` is rank 0 again (head + loss, no blocks,
  ``lo == hi == L``).  The edge from stage ``N-1`` to stage ``N`` is the
  *closing edge* of the ring: activations travel rank ``N-1 -> 0`` and the
  gradient of the loss travels back rank ``0 -> N-1``.  Stages 0 and ``N``
  share a rank but are not adjacent, so they never exchange messages; every
  message crosses between two different ranks (which is why ``N >= 2``).

Frontier
--------
Adapters of blocks ``>= frontier`` are trainable, blocks below are frozen, the
embedding is always frozen.  A stage *does backward* iff ``frontier < hi``
(some block at or below its top is trainable, so the gradient has to reach or
cross it) or it owns a trainable head (``head_trainable``).  For a stage with
blocks this is exactly "it has a trainable block" (the head stage always has
``hi == L``, so it does backward as soon as anything is trainable); a stage
with no blocks does backward only when it must relay the gradient to a
trainable stage below it.  The backward stages are therefore a suffix
``s0 .. S-1`` of the stage list, and the gradient for stage ``s-1`` is sent
only when stage ``s-1`` does backward: the stage holding the frontier is the
last to receive gradients.

Actions and schedules
---------------------
Per stage, the compute order is ``gpipe`` (all forwards, then all backwards)
or ``1f1b`` (``min(S-1-s, M)`` warm-up forwards, then forward/backward pairs,
then the remaining backwards), see :func:`stage_order`.  Stages of the same
rank (stages 0 and ``N`` in the ring) are merged by a lockstep simulation,
see :func:`build_schedule`, and each compute action is wrapped by the
receive it needs and the send it feeds.  The optimizer step after the list is
not an action: every rank takes it once its list is done.

Channel order
-------------
Every (src, dst) pair is a FIFO channel: its messages are received in the
order they were sent, which is all NCCL offers (it ignores tags) and what the
wire relies on everywhere.  Where a rank would consume a later message first
(rank 0 of a ring takes gradients from the closing edge and activations from
rank N-1 in an order of its own), :func:`build_schedule` moves the receive of
the earlier message forward, right before the later one; the earlier message
was sent first, so it has arrived by then and nobody waits longer.
:meth:`Plan.validate` checks every channel.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "RING", "LINE", "MODES", "GPIPE", "ONE_F_ONE_B", "SCHEDULES",
    "RECV_F", "F", "SEND_F", "RECV_B", "B", "SEND_B",
    "KINDS", "COMPUTE_KINDS",
    "PlanError", "DeadlockError",
    "Stage", "Action", "Message", "Plan",
    "build_stages", "does_backward", "stage_order", "build_schedule",
    "simulate", "simulate_shared", "trainable_blocks", "frontier_of",
]

RING = "ring"
LINE = "line"
MODES = (RING, LINE)

GPIPE = "gpipe"
ONE_F_ONE_B = "1f1b"
SCHEDULES = (GPIPE, ONE_F_ONE_B)

RECV_F = "RECV_F"
F = "F"
SEND_F = "SEND_F"
RECV_B = "RECV_B"
B = "B"
SEND_B = "SEND_B"
KINDS = (RECV_F, F, SEND_F, RECV_B, B, SEND_B)
COMPUTE_KINDS = frozenset({F, B})
_SENDS = frozenset({SEND_F, SEND_B})
_RECVS = frozenset({RECV_F, RECV_B})

_SHORT = {F: "F", B: "B", SEND_F: "sF", RECV_F: "rF", SEND_B: "sB", RECV_B: "rB"}


class PlanError(ValueError):
    """A plan (or the arguments to build one) is inconsistent."""


class DeadlockError(PlanError):
    """Executing the per-rank lists in order would block forever."""


@dataclass(frozen=True)
class Stage:
    """One virtual pipeline stage: blocks ``[lo, hi)`` on ``rank``."""

    index: int
    rank: int
    lo: int
    hi: int
    has_embed: bool
    has_head: bool

    @property
    def num_blocks(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class Action:
    """One step of a rank's list.

    ``stage`` is the virtual stage the action belongs to, ``mb`` the
    micro-batch and ``peer`` the other rank of a
    send or receive (``None`` for compute).  A receive carries the stage that
    consumes the message, a send the stage that produced it.
    """

    kind: str
    stage: int
    mb: int
    peer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        text = f"{_SHORT[self.kind]}{self.stage}.{self.mb}"
        if self.kind in _SENDS:
            return f"{text}>{self.peer}"
        if self.kind in _RECVS:
            return f"{text}<{self.peer}"
        return text


class Message(NamedTuple):
    """One point-to-point transfer: ``kind`` is ``'F'`` or ``'B'``."""

    kind: str
    src: int
    dst: int
    stage: int  # the stage that produced the tensor
    mb: int


def _msg_key(action: Action) -> tuple[str, int, int]:
    """Identify a transfer by (direction, producing stage, mb) from either end."""
    k = action.kind
    if k == SEND_F:
        return (F, action.stage, action.mb)
    if k == RECV_F:
        return (F, action.stage - 1, action.mb)
    if k == SEND_B:
        return (B, action.stage, action.mb)
    if k == RECV_B:
        return (B, action.stage + 1, action.mb)
    raise ValueError(f"{action} is not a send or receive")


# ---------------------------------------------------------------- arguments


def _check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    # bool is an int subclass; True as a count is almost always a bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return value


def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


# ------------------------------------------------------------------- stages


def build_stages(mode: str, blocks_per_rank: Sequence[int]) -> list[Stage]:
    """Return the virtual stages of ``mode`` for a partition of the blocks.

    ``ring`` needs at least 2 ranks and yields ``N + 1`` stages (the last one
    is rank 0's head stage); ``line`` needs at least 1 rank and yields ``N``.
    """
    _check_choice("mode", mode, MODES)
    if isinstance(blocks_per_rank, (str, bytes)) or not isinstance(blocks_per_rank, Sequence):
        raise ValueError(f"blocks_per_rank must be a list of ints, got {blocks_per_rank!r}")
    n = len(blocks_per_rank)
    min_ranks = 2 if mode == RING else 1
    if n < min_ranks:
        raise ValueError(
            f"blocks_per_rank must have at least {min_ranks} entries for mode {mode!r}, "
            f"got {list(blocks_per_rank)!r}"
        )
    for r, count in enumerate(blocks_per_rank):
        _check_int(f"blocks_per_rank[{r}]", count, lo=0)

    stages: list[Stage] = []
    lo = 0
    for r, count in enumerate(blocks_per_rank):
        stages.append(
            Stage(
                index=r,
                rank=r,
                lo=lo,
                hi=lo + count,
                has_embed=r == 0,
                has_head=mode == LINE and r == n - 1,
            )
        )
        lo += count
    if mode == RING:
        stages.append(Stage(index=n, rank=0, lo=lo, hi=lo, has_embed=False, has_head=True))
    return stages


def does_backward(stage: Stage, frontier: int, head_trainable: bool = False) -> bool:
    """Whether ``stage`` runs backward passes for the given frontier.

    ``frontier < stage.hi`` covers trainable blocks on the stage itself, the
    head stage (``hi == L``) as soon as any block is trainable, and block-less
    stages that sit between the loss and a trainable block and must relay the
    gradient.
    """
    return frontier < stage.hi or (stage.has_head and head_trainable)


def _backward_flags(stages: Sequence[Stage], frontier: int, head_trainable: bool) -> list[bool]:
    flags = [does_backward(st, frontier, head_trainable) for st in stages]
    first = next((s for s, flag in enumerate(flags) if flag), len(flags))
    if not all(flags[first:]):
        # Unreachable with consecutive blocks; guards the stage model itself.
        raise AssertionError(f"backward stages must form a suffix, got {flags}")
    return flags


# ----------------------------------------------------------------- schedule


def stage_order(
    schedule: str, stage: int, num_stages: int, micro_batches: int, backward: bool
) -> list[tuple[str, int]]:
    """Compute order ``[(kind, mb), ...]`` of one stage, kind ``F`` or ``B``.

    ``gpipe``: ``F0 .. F(M-1)`` then ``B0 .. B(M-1)``.  ``1f1b``: ``w =
    min(S-1-s, M)`` warm-up forwards, then ``(F(w+i), B(i))`` pairs, then the
    last ``w`` backwards, so at most ``min(S-s, M)`` activations are alive on
    the stage.  Stages without backward run their forwards in order.
    """
    _check_choice("schedule", schedule, SCHEDULES)
    forwards = [(F, m) for m in range(micro_batches)]
    if not backward:
        return forwards
    if schedule == GPIPE:
        return forwards + [(B, m) for m in range(micro_batches)]
    warmup = min(num_stages - 1 - stage, micro_batches)
    order = forwards[:warmup]
    for i in range(micro_batches - warmup):
        order.append((F, warmup + i))
        order.append((B, i))
    order.extend((B, m) for m in range(micro_batches - warmup, micro_batches))
    return order


def _merge(
    stages: Sequence[Stage], orders: Sequence[list[tuple[str, int]]], num_ranks: int, eager_first: bool = False
) -> list[list[tuple[str, int, int]]]:
    """Interleave the stage orders of each rank by a lockstep simulation.

    Every compute action takes one tick.  On each tick each rank looks at the
    next pending action of each of its stages and runs one whose inputs were
    produced on an earlier tick.  Priority: backward before forward, then the
    higher stage, then the lower micro-batch.  Returns ``(kind, stage, mb)``
    per rank in execution order; raises :class:`DeadlockError` on a stall.

    ``eager_first``: a ready forward of stage 0 goes before any other
    forward (a ready backward still goes first; ring rank 0 with a frozen
    stage 0, see :func:`build_schedule`).

    Only ring rank 0 ever has a choice, between stage 0 and stage N.  Two
    ready forwards are F(N, m') and F(0, m) with m' < m, so "higher stage" is
    also "lower micro-batch" there.  Two ready backwards are B(N, m') and
    B(0, m) with m' > m; B(N, m') goes first because it unblocks rank N-1's
    backward chain while B(0, m) unblocks nothing.  In a sweep of ring plans
    (N = 2..5, M = 1..12, both schedules, unit and 2x-backward costs)
    taking the lower micro-batch first was never faster and often slower.
    """
    last = len(stages) - 1
    by_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for st in stages:
        by_rank[st.rank].append(st.index)
    pos = [0] * len(stages)
    done: dict[tuple[str, int, int], int] = {}
    merged: list[list[tuple[str, int, int]]] = [[] for _ in range(num_ranks)]
    remaining = sum(len(o) for o in orders)
    never = float("inf")

    def ready(kind: str, s: int, m: int, tick: int) -> bool:
        if kind == F:
            return s == 0 or done.get((F, s - 1, m), never) < tick
        if done.get((F, s, m), never) >= tick:
            return False
        return s == last or done.get((B, s + 1, m), never) < tick

    tick = 0
    while remaining:
        progressed = False
        for r in range(num_ranks):
            best = None
            for s in by_rank[r]:
                if pos[s] == len(orders[s]):
                    continue
                kind, m = orders[s][pos[s]]
                if not ready(kind, s, m, tick):
                    continue
                key = (kind != B, not (eager_first and s == 0), -s, m)
                if best is None or key < best[0]:
                    best = (key, s, kind, m)
            if best is not None:
                _, s, kind, m = best
                pos[s] += 1
                done[(kind, s, m)] = tick
                merged[r].append((kind, s, m))
                remaining -= 1
                progressed = True
        if not progressed:
            heads = ", ".join(
                f"{orders[s][pos[s]][0]}{s}.{orders[s][pos[s]][1]}"
                for s in range(len(stages))
                if pos[s] < len(orders[s])
            )
            raise DeadlockError(f"deadlock while merging stage orders at tick {tick}; blocked: {heads}")
        tick += 1
    return merged


def _list_merge(
    stages: Sequence[Stage],
    orders: Sequence[list[tuple[str, int]]],
    num_ranks: int,
    cost: Callable[[Action], float],
    head_first: bool,
) -> list[list[tuple[str, int, int]]]:
    """Interleave the stage orders of each rank by an event simulation with ``cost`` per compute action.

    A rank that comes free runs the next pending action of one of its stages whose inputs are done by then,
    the higher stage's if ``head_first``, else the lower's; with none ready it waits for the first to become
    ready (messages are free).  Unlike :func:`_merge`'s unit ticks, an expensive head holds rank 0 for as
    long as it costs, and rank 0 fills the time its head waits for with stage 0's work.  Returns ``(kind,
    stage, mb)`` per rank in execution order; raises :class:`DeadlockError` on a stall.
    """
    last = len(stages) - 1
    by_rank: list[list[int]] = [[] for _ in range(num_ranks)]
    for st in stages:
        by_rank[st.rank].append(st.index)
    prefs = [sorted(ss, reverse=head_first) for ss in by_rank]
    pos = [0] * len(stages)
    done: dict[tuple[str, int, int], float] = {}
    merged: list[list[tuple[str, int, int]]] = [[] for _ in range(num_ranks)]
    free_at = [0.0] * num_ranks
    remaining = sum(len(o) for o in orders)

    def inputs(kind: str, s: int, m: int) -> list[tuple[str, int, int]]:
        if kind == F:
            return [] if s == 0 else [(F, s - 1, m)]
        return [(F, s, m)] if s == last else [(F, s, m), (B, s + 1, m)]

    while remaining:
        # Each rank's next start: the preferred stage ready when it comes free, else the first to become ready.
        # The rank that starts first goes; nothing not yet placed can end before it starts (costs are >= 0).
        best = None
        for r in range(num_ranks):
            for s in prefs[r]:
                if pos[s] == len(orders[s]):
                    continue
                kind, m = orders[s][pos[s]]
                needs = inputs(kind, s, m)
                if any(n not in done for n in needs):
                    continue
                start = max([free_at[r]] + [done[n] for n in needs])
                if best is None or (start, r) < best[0]:
                    best = ((start, r), r, s, kind, m)
        if best is None:
            heads = ", ".join(f"{orders[s][pos[s]][0]}{s}.{orders[s][pos[s]][1]}"
                              for s in range(len(stages)) if pos[s] < len(orders[s]))
            raise DeadlockError(f"deadlock while merging stage orders by cost; blocked: {heads}")
        (start, _), r, s, kind, m = best
        pos[s] += 1
        done[(kind, s, m)] = free_at[r] = start + cost(Action(kind, s, m))
        merged[r].append((kind, s, m))
        remaining -= 1
    return merged


def build_schedule(
    mode: str,
    blocks_per_rank: Sequence[int],
    micro_batches: int,
    frontier: int,
    head_trainable: bool = False,
    schedule: str = GPIPE,
    head_cost: float | None = None,
    speeds: Sequence[float] | None = None,
) -> Plan:
    """Build and validate the per-rank action lists of one global batch.

    Each stage's compute order comes from :func:`stage_order`; the orders of
    the stages sharing a rank are interleaved by a lockstep simulation with
    unit-time compute: at every tick each rank runs one action among the next
    pending actions of its stages whose inputs were produced on an earlier
    tick, choosing a backward over a forward, then the higher stage (closer to
    the loss), then the lower micro-batch (see :func:`_merge`).  Around each
    compute action the needed ``RECV`` is placed right before it and the
    ``SEND`` right after it, and receives move forward where a channel must be
    read in its sending order (see Channel order).  The result has passed
    :meth:`Plan.validate`.

    ``head_cost`` (the head's work in block units, see
    ``partition.head_cost_in_blocks``): in a ring, rank 0 holds two stages
    and the unit-tick interleaving above ignores that the head costs many
    blocks.  With a ``head_cost`` the plan is the fastest under block-unit
    costs (:func:`block_unit_cost`; a tie keeps the earlier) of: the order
    above; where stage 0 does no backward, the same with stage 0's forwards
    first (they depend on nothing but the data, and hold no graph); and the
    two cost-aware interleavings of :func:`_list_merge`.  Each stage keeps
    its own order, so its activations stay within the schedule's bound.
    ``speeds`` (one per rank, relative; e.g. a profile's): each rank's costs
    over its speed, for ranks of unequal speed.
    """
    stages = build_stages(mode, blocks_per_rank)
    num_ranks = len(blocks_per_rank)
    num_blocks = stages[-1].hi
    _check_int("micro_batches", micro_batches, lo=1)
    _check_int("frontier", frontier, lo=0, hi=num_blocks)
    if not isinstance(head_trainable, bool):
        raise ValueError(f"head_trainable must be a bool, got {head_trainable!r}")
    _check_choice("schedule", schedule, SCHEDULES)

    bwd = _backward_flags(stages, frontier, head_trainable)
    num_stages = len(stages)
    orders = [stage_order(schedule, s, num_stages, micro_batches, bwd[s]) for s in range(num_stages)]

    def plan_of(merged: list[list[tuple[str, int, int]]]) -> Plan:
        plan = Plan(stages=stages, num_ranks=num_ranks, micro_batches=micro_batches, frontier=frontier,
                    schedule=schedule, mode=mode, actions=_actions(stages, bwd, merged),
                    head_trainable=head_trainable)
        plan.validate()
        return plan

    plan = plan_of(_merge(stages, orders, num_ranks))
    if head_cost is None or mode != RING:
        return plan
    cost = block_unit_cost(stages, frontier, head_cost, speeds)
    candidates = [plan]
    if not bwd[0]:
        candidates.append(plan_of(_merge(stages, orders, num_ranks, eager_first=True)))
    for head_first in (True, False):
        candidates.append(plan_of(_list_merge(stages, orders, num_ranks, cost, head_first)))
    return min(candidates, key=lambda p: simulate(p, cost)["makespan"])  # the first of equals: the order above


def block_unit_cost(stages: Sequence[Stage], frontier: int, head_cost: float,
                    speeds: Sequence[float] | None = None) -> Callable[[Action], float]:
    """A compute action's work in block units, from the plan's structure alone (so that every rank, building
    its plan on its own, makes the same choice): a forward costs its blocks (the head's ``head_cost`` on the
    head's stage: its gradient is taken in the forward, see train.head_loss), a backward its trainable blocks
    (a LoRA block's backward through frozen weights costs about its forward). With ``speeds``, over the
    speed of the stage's rank."""
    num_ranks = max(st.rank for st in stages) + 1
    if speeds is not None and (len(speeds) != num_ranks or not all(v > 0 for v in speeds)):
        raise ValueError(f"speeds must hold one value > 0 per rank ({num_ranks}), got {list(speeds)!r}")

    def cost(a: Action) -> float:
        st = stages[a.stage]
        if a.kind == F:
            work = st.num_blocks + (head_cost if st.has_head else 0.0)
        else:
            work = max(0, st.hi - max(st.lo, frontier))
        return work / speeds[st.rank] if speeds is not None else float(work)

    return cost


def _actions(stages: Sequence[Stage], bwd: Sequence[bool], merged: list[list[tuple[str, int, int]]]
             ) -> list[list[Action]]:
    """Each rank's compute order with the receive each action needs before it and the send it feeds after it,
    receives moved forward into channel order."""
    last = len(stages) - 1
    actions: list[list[Action]] = []
    for compute in merged:
        acts: list[Action] = []
        for kind, s, m in compute:
            if kind == F:
                if s > 0:
                    acts.append(Action(RECV_F, s, m, stages[s - 1].rank))
                acts.append(Action(F, s, m))
                if s < last:
                    acts.append(Action(SEND_F, s, m, stages[s + 1].rank))
            else:
                if s < last:
                    acts.append(Action(RECV_B, s, m, stages[s + 1].rank))
                acts.append(Action(B, s, m))
                if s > 0 and bwd[s - 1]:
                    acts.append(Action(SEND_B, s, m, stages[s - 1].rank))
        actions.append(acts)
    return _in_channel_order(actions)


def _in_channel_order(actions: list[list[Action]]) -> list[list[Action]]:
    """Move receives forward so that every (src, dst) channel is read in its sending order (see Channel order):
    where a rank would receive a later message of a channel first, it receives the earlier ones right before."""
    sent: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            if a.kind in _SENDS:
                sent.setdefault((r, a.peer), []).append(_msg_key(a))
    ordered = []
    for r, acts in enumerate(actions):
        receive = {(a.peer, _msg_key(a)): a for a in acts if a.kind in _RECVS}
        position: dict[int, int] = {}  # source rank -> how many of its messages were received
        out: list[Action] = []
        for a in acts:
            if a.kind not in _RECVS:
                out.append(a)
                continue
            order, i = sent.get((a.peer, r), []), position.get(a.peer, 0)
            key = _msg_key(a)
            if key not in order[i:]:
                continue  # received earlier, in channel order
            while True:
                out.append(receive[(a.peer, order[i])])
                i += 1
                if order[i - 1] == key:
                    break
            position[a.peer] = i
        ordered.append(out)
    return ordered


# --------------------------------------------------------------------- plan


@dataclass
class Plan:
    """Per-rank action lists for one global batch, plus what they were built from."""

    stages: list[Stage]
    num_ranks: int
    micro_batches: int
    frontier: int
    schedule: str
    mode: str
    actions: list[list[Action]]
    head_trainable: bool = False

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_blocks(self) -> int:
        return self.stages[-1].hi

    @property
    def backward(self) -> list[bool]:
        """``backward[s]``: whether stage ``s`` runs backward passes."""
        return [does_backward(st, self.frontier, self.head_trainable) for st in self.stages]

    def stages_of(self, rank: int) -> list[Stage]:
        return [st for st in self.stages if st.rank == rank]

    def messages(self) -> list[Message]:
        """Every send of the plan, in rank order then list order."""
        out = []
        for r, acts in enumerate(self.actions):
            for a in acts:
                if a.kind in _SENDS:
                    out.append(Message(F if a.kind == SEND_F else B, r, a.peer, a.stage, a.mb))
        return out

    def format(self, compute_only: bool = False) -> str:
        """One line per rank, e.g. ``rank 1: rF1.0<0 F1.0 sF1.0>2 ...``."""
        lines = []
        for r, acts in enumerate(self.actions):
            shown = (a for a in acts if not compute_only or a.kind in COMPUTE_KINDS)
            lines.append(f"rank {r}: " + " ".join(str(a) for a in shown))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def validate(self) -> None:
        """Raise :class:`PlanError` (a ``ValueError``) on any inconsistency.

        Checks that every action sits on the rank of its stage with the right
        peer, that each stage runs ``F`` once per micro-batch and ``B`` once
        per micro-batch iff it does backward (after its ``F``), that every
        expected transfer has exactly one send (after the producing compute)
        and one receive (before the consuming compute), that every channel
        is received in its sending order, and finally that executing the
        lists strictly in order,
        with blocking receives and non-blocking sends, terminates
        (:class:`DeadlockError` otherwise).
        """
        n, m_count, stages = self.num_ranks, self.micro_batches, self.stages
        s_count = len(stages)
        if s_count == 0:
            raise PlanError("plan has no stages")
        for i, st in enumerate(stages):
            if st.index != i or not 0 <= st.rank < n:
                raise PlanError(f"stage {i} is malformed: {st}")
        if len(self.actions) != n:
            raise PlanError(f"plan has {len(self.actions)} action lists for {n} ranks")
        bwd = self.backward
        last = s_count - 1

        f_pos: dict[tuple[int, int], int] = {}
        b_pos: dict[tuple[int, int], int] = {}
        sends: dict[tuple[str, int, int], int] = {}
        recvs: dict[tuple[str, int, int], int] = {}
        for r, acts in enumerate(self.actions):
            for i, a in enumerate(acts):
                if not isinstance(a, Action):
                    raise PlanError(f"rank {r} action {i}: not an Action: {a!r}")
                where = f"rank {r} action {i} ({a})"
                s, m = a.stage, a.mb
                if not 0 <= s < s_count:
                    raise PlanError(f"{where}: stage out of range [0, {s_count})")
                if stages[s].rank != r:
                    raise PlanError(f"{where}: stage {s} lives on rank {stages[s].rank}")
                if not 0 <= m < m_count:
                    raise PlanError(f"{where}: micro-batch out of range [0, {m_count})")
                if a.kind in (F, B):
                    if a.peer is not None:
                        raise PlanError(f"{where}: compute actions take peer=None")
                    if a.kind == B and not bwd[s]:
                        raise PlanError(
                            f"{where}: stage {s} does no backward at frontier {self.frontier}"
                        )
                    table = f_pos if a.kind == F else b_pos
                    if (s, m) in table:
                        raise PlanError(f"{where}: duplicate {a.kind}{s}.{m}")
                    table[(s, m)] = i
                    continue
                if a.kind == RECV_F:
                    other, exists = s - 1, s > 0
                elif a.kind == SEND_F:
                    other, exists = s + 1, s < last
                elif a.kind == RECV_B:
                    other, exists = s + 1, s < last and bwd[s]
                else:
                    other, exists = s - 1, s > 0 and bwd[s - 1]
                if not exists:
                    raise PlanError(f"{where}: no such transfer exists in this plan")
                if a.peer != stages[other].rank:
                    raise PlanError(f"{where}: peer must be rank {stages[other].rank} (stage {other})")
                key = _msg_key(a)
                table = sends if a.kind in _SENDS else recvs
                if key in table:
                    raise PlanError(f"{where}: duplicate {'send' if table is sends else 'receive'}")
                table[key] = i

        for s in range(s_count):
            for m in range(m_count):
                if (s, m) not in f_pos:
                    raise PlanError(f"F{s}.{m} is missing on rank {stages[s].rank}")
                if bwd[s]:
                    if (s, m) not in b_pos:
                        raise PlanError(f"B{s}.{m} is missing on rank {stages[s].rank}")
                    if b_pos[(s, m)] < f_pos[(s, m)]:
                        raise PlanError(f"B{s}.{m} comes before F{s}.{m} on rank {stages[s].rank}")

        for s in range(s_count):
            for m in range(m_count):
                if s < last:
                    self._check_transfer((F, s, m), sends, recvs, f_pos[(s, m)], f_pos[(s + 1, m)], s + 1)
                if s > 0 and bwd[s - 1]:
                    self._check_transfer((B, s, m), sends, recvs, b_pos[(s, m)], b_pos[(s - 1, m)], s - 1)

        sent: dict[tuple[int, int], list] = {}
        received: dict[tuple[int, int], list] = {}
        for r, acts in enumerate(self.actions):
            for a in acts:
                if a.kind in _SENDS:
                    sent.setdefault((r, a.peer), []).append(_msg_key(a))
                elif a.kind in _RECVS:
                    received.setdefault((a.peer, r), []).append(_msg_key(a))
        for (src, dst), order in sent.items():
            got = received.get((src, dst), [])
            if got != order:
                i = next(i for i, (x, y) in enumerate(zip(order, got + [None] * len(order))) if x != y)
                raise PlanError(f"channel rank {src} -> {dst} is not read in its sending order: message {i} sent is "
                                f"{order[i]}, received is {got[i] if i < len(got) else None}")

        _execute(self.actions, _no_cost, None)

    def _check_transfer(self, key, sends, recvs, produced_at, consumed_at, consumer) -> None:
        kind, s, m = key
        src, dst = self.stages[s].rank, self.stages[consumer].rank
        name = f"{'activation' if kind == F else 'gradient'} of stage {s} mb {m} (rank {src} -> {dst})"
        if key not in sends:
            raise PlanError(f"{name}: no SEND on rank {src}")
        if key not in recvs:
            raise PlanError(f"{name}: SEND has no matching RECV on rank {dst}")
        if sends[key] < produced_at:
            raise PlanError(f"{name}: sent before {kind}{s}.{m} computed it")
        if recvs[key] > consumed_at:
            raise PlanError(f"{name}: received after {kind}{consumer}.{m} needed it")


# --------------------------------------------------------------- execution


def _no_cost(action: Action) -> float:
    return 0.0


def _execute(
    actions: Sequence[Sequence[Action]],
    cost: Callable[[Action], float],
    link_cost: Callable[[Action], float] | None,
) -> tuple[list[float], list[float], list[float]]:
    """Run every rank's list in order; return (finish, busy, idle) per rank.

    Receives block until the matching send has run (plus its link time);
    sends never block.  A rank runs until it blocks and is woken by the send
    it waits for, so each action is visited once.
    """
    n = len(actions)
    pc = [0] * n
    clock = [0.0] * n
    busy = [0.0] * n
    idle = [0.0] * n
    arrival: dict[tuple[str, int, int], float] = {}
    waiting: dict[tuple[str, int, int], list[int]] = {}
    runnable = deque(range(n))
    while runnable:
        r = runnable.popleft()
        acts, i, t = actions[r], pc[r], clock[r]
        while i < len(acts):
            a = acts[i]
            if a.kind in _RECVS:
                key = _msg_key(a)
                avail = arrival.get(key)
                if avail is None:
                    waiting.setdefault(key, []).append(r)
                    break
                if avail > t:
                    idle[r] += avail - t
                    t = avail
            elif a.kind in _SENDS:
                delay = 0.0 if link_cost is None else link_cost(a)
                if delay < 0:
                    raise ValueError(f"link_cost({a}) must be >= 0, got {delay!r}")
                key = _msg_key(a)
                arrival[key] = t + delay
                runnable.extend(waiting.pop(key, ()))
            else:
                d = cost(a)
                if d < 0:
                    raise ValueError(f"cost({a}) must be >= 0, got {d!r}")
                busy[r] += d
                t += d
            i += 1
        pc[r], clock[r] = i, t
    stuck = [r for r in range(n) if pc[r] < len(actions[r])]
    if stuck:
        detail = "; ".join(f"rank {r} waits at action {pc[r]} ({actions[r][pc[r]]})" for r in stuck)
        raise DeadlockError(f"deadlock: {detail}")
    return clock, busy, idle


def simulate(
    plan: Plan,
    cost: Callable[[Action], float],
    link_cost: Callable[[Action], float] | None = None,
) -> dict:
    """Time the plan with each rank executing its list strictly in order.

    ``cost(action)`` is the duration of an ``F`` or ``B``; sends and
    receives take no rank time.  ``link_cost(send)``, if given, is the transfer
    time between a send and the moment the matching receive can complete.
    Returns ``{"finish": [...], "busy": [...], "idle": [...], "makespan": t}``
    where ``idle`` is the time each rank spent blocked in receives (so
    ``finish == busy + idle``).  Raises :class:`DeadlockError` if the lists
    cannot complete.  Runs in O(number of actions).
    """
    finish, busy, idle = _execute(plan.actions, cost, link_cost)
    return {"finish": finish, "busy": busy, "idle": idle, "makespan": max(finish, default=0.0)}


def simulate_shared(
    actions: Sequence[Sequence[Action]] | Plan,
    cost: Callable[[Action], float],
    link_cost: Callable[[Action], float] | None = None,
    *,
    cores: int | None = None,
    slowdown: Sequence[float] | None = None,
    msg_cost: Callable[[Action], float] | None = None,
) -> dict:
    """Time per-rank action lists whose ranks share the cores of one box, as emulated runs do.

    ``actions`` are a plan's lists (or the :class:`Plan`) or hand-built ones;
    each rank runs its list strictly in order, and sends and receives match by
    transfer as in :func:`simulate`.  ``cost(a)`` is the CPU seconds of an
    ``F`` or ``B`` on an uncontended core of this machine, ``msg_cost(a)``
    (default 0) those of a send or receive itself (copying; a receive's part
    runs once its message has arrived), and ``link_cost(send)`` the wire delay
    from the end of the send to the moment the receive can complete.

    ``cores``: None gives every rank a core of its own; an int shares them:
    the ``k`` ranks holding CPU work at a moment each progress at
    ``min(1, cores / k)`` (processor sharing, rates change at every start and
    end).  ``slowdown[r]`` (default 0) mirrors ``runtime._emulate``: after a
    compute action of rank ``r`` that took wall time ``D`` (contention
    included), the rank sleeps ``D * slowdown[r]`` holding no core.

    Returns ``{"finish", "busy", "cpu", "idle", "makespan", "utilization"}``:
    per rank the finish time, the wall time in compute (its sleeps and message
    CPU included), the CPU seconds and the time blocked in receives, then the
    makespan and the CPU over ``(cores or ranks) x makespan``.  Without
    sharing, slowdown or message cost it gives exactly :func:`simulate`'s
    numbers.  Raises :class:`DeadlockError` if the lists cannot complete.
    O(actions x log ranks): CPU work is tracked in virtual time (the work a
    rank that held CPU all along would have done), so a change of rates
    touches no task.
    """
    if isinstance(actions, Plan):
        actions = actions.actions
    n = len(actions)
    if cores is not None:
        _check_int("cores", cores, lo=1)
    slow = [0.0] * n if slowdown is None else [float(s) for s in slowdown]
    if len(slow) != n or not all(s >= 0 for s in slow):
        raise ValueError(f"slowdown must hold one value >= 0 per rank ({n}), got {slowdown!r}")

    def checked(fn: Callable[[Action], float] | None, a: Action, name: str) -> float:
        value = 0.0 if fn is None else fn(a)
        if not value >= 0:
            raise ValueError(f"{name}({a}) must be >= 0, got {value!r}")
        return value

    free, cpu_task, blocked, asleep = 0, 1, 2, 3  # what each rank is doing at its current action
    pc, state = [0] * n, [free] * n
    finish, busy, cpu, idle = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    began, work, epoch_at = [0.0] * n, [0.0] * n, [0] * n
    arrival: dict[tuple[str, int, int], float] = {}
    waiting: dict[tuple[str, int, int], list[int]] = {}
    tasks: list[tuple[float, int, int]] = []  # (virtual finish, seq, rank) of the CPU work in progress
    timers: list[tuple[float, int, int]] = []  # (time, seq, rank): a sleep ends or a message arrives
    ready = deque(range(n))
    # virtual time = now - lag; lag grows only while tasks run below rate 1, so it stays exactly 0 (and every
    # end exactly start + work) without sharing; epoch counts the stretches below rate 1
    now, lag, epoch, seq = 0.0, 0.0, 0, 0

    def start_cpu(r: int, w: float) -> bool:
        nonlocal seq
        if w <= 0:
            return False
        began[r], work[r], epoch_at[r], state[r] = now, w, epoch, cpu_task
        heapq.heappush(tasks, ((now - lag) + w, seq, r))
        seq += 1
        return True

    def wait_until(r: int, t: float) -> None:
        nonlocal seq
        heapq.heappush(timers, (t, seq, r))
        seq += 1

    def post(a: Action) -> None:
        key = _msg_key(a)
        arrival[key] = now + checked(link_cost, a, "link_cost")
        for w in waiting.pop(key, ()):
            wait_until(w, arrival[key])

    def next_action(r: int) -> None:
        pc[r], state[r] = pc[r] + 1, free
        ready.append(r)

    def advance(r: int) -> None:
        """Run rank ``r`` from its current action until it takes CPU, blocks, sleeps or is done."""
        acts = actions[r]
        while pc[r] < len(acts):
            a = acts[pc[r]]
            if a.kind in _RECVS:
                avail = arrival.get(_msg_key(a))
                if avail is None or avail > now:
                    state[r], began[r] = blocked, now
                    if avail is None:
                        waiting.setdefault(_msg_key(a), []).append(r)
                    else:
                        wait_until(r, avail)
                    return
                if start_cpu(r, checked(msg_cost, a, "msg_cost")):
                    return
            elif a.kind in _SENDS:
                if start_cpu(r, checked(msg_cost, a, "msg_cost")):
                    return
                post(a)
            elif start_cpu(r, checked(cost, a, "cost")):
                return
            pc[r] += 1
        finish[r] = now

    def cpu_done(r: int) -> None:
        a = actions[r][pc[r]]
        wall = work[r] if epoch_at[r] == epoch else now - began[r]
        busy[r] += wall
        cpu[r] += work[r]
        if a.kind in _SENDS:
            post(a)
        elif a.kind in COMPUTE_KINDS and slow[r] > 0:
            nap = wall * slow[r]
            busy[r] += nap
            state[r] = asleep
            wait_until(r, now + nap)
            return
        next_action(r)

    def timer_done(r: int) -> None:
        if state[r] == blocked:  # the message has arrived: the receive's own CPU part, if any
            idle[r] += now - began[r]
            state[r] = free
            if start_cpu(r, checked(msg_cost, actions[r][pc[r]], "msg_cost")):
                return
        next_action(r)

    while True:
        while ready:
            advance(ready.popleft())
        rate = 1.0 if cores is None or len(tasks) <= cores else cores / len(tasks)
        t_cpu = math.inf
        if tasks:
            vmin = tasks[0][0]
            t_cpu = max(now, vmin + lag if rate == 1.0 else now + (vmin - (now - lag)) / rate)
        t_timer = timers[0][0] if timers else math.inf
        if t_cpu == math.inf and t_timer == math.inf:
            break
        t_next = min(t_cpu, t_timer)
        if rate < 1.0 and t_next > now:
            lag += (1.0 - rate) * (t_next - now)
            epoch += 1
        now = t_next
        if t_cpu <= t_timer:
            done_by = max(vmin, now - lag)
            while tasks and tasks[0][0] <= done_by:
                cpu_done(heapq.heappop(tasks)[2])
        while timers and timers[0][0] <= now:
            timer_done(heapq.heappop(timers)[2])

    stuck = [r for r in range(n) if pc[r] < len(actions[r])]
    if stuck:
        detail = "; ".join(f"rank {r} waits at action {pc[r]} ({actions[r][pc[r]]})" for r in stuck)
        raise DeadlockError(f"deadlock: {detail}")
    makespan = max(finish, default=0.0)
    capacity = (cores or n) * makespan
    return {"finish": finish, "busy": busy, "cpu": cpu, "idle": idle, "makespan": makespan,
            "utilization": sum(cpu) / capacity if capacity else 0.0}


# ----------------------------------------------------------------- frontier


def trainable_blocks(step: int, num_blocks: int, initial: int, every: int, increment: int) -> int:
    """Number of trainable top blocks at optimizer ``step``.

    ``min(num_blocks, initial + increment * (step // every))``; ``every == 0``
    disables the schedule and makes all blocks trainable.
    """
    _check_int("step", step, lo=0)
    _check_int("num_blocks", num_blocks, lo=0)
    _check_int("initial", initial, lo=0)
    _check_int("every", every, lo=0)
    _check_int("increment", increment, lo=0)
    if every == 0:
        return num_blocks
    return min(num_blocks, initial + increment * (step // every))


def frontier_of(trainable: int, num_blocks: int) -> int:
    """Lowest trainable block index when the top ``trainable`` blocks train."""
    _check_int("num_blocks", num_blocks, lo=0)
    _check_int("trainable", trainable, lo=0, hi=num_blocks)
    return num_blocks - trainable
