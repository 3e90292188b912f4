"""Tests for ringada.schedule: stage model, plans, validation and timing."""

from collections import Counter
from dataclasses import replace

import pytest

from ringada.schedule import _execute
from ringada.schedule import (
    B,
    F,
    RECV_B,
    RECV_F,
    SEND_B,
    SEND_F,
    Action,
    DeadlockError,
    Message,
    Stage,
    block_unit_cost,
    build_schedule,
    build_stages,
    does_backward,
    frontier_of,
    simulate,
    simulate_shared,
    stage_order,
    trainable_blocks,
)


def unit(action):
    return 1.0


def compute_line(plan, rank):
    return [str(a) for a in plan.actions[rank] if a.kind in (F, B)]


# ------------------------------------------------------------------ stages


def test_ring_stages_uneven_with_empty_rank0():
    stages = build_stages("ring", [0, 3, 1])
    assert stages == [
        Stage(index=0, rank=0, lo=0, hi=0, has_embed=True, has_head=False),
        Stage(index=1, rank=1, lo=0, hi=3, has_embed=False, has_head=False),
        Stage(index=2, rank=2, lo=3, hi=4, has_embed=False, has_head=False),
        Stage(index=3, rank=0, lo=4, hi=4, has_embed=False, has_head=True),
    ]


def test_ring_stages_uneven():
    stages = build_stages("ring", [1, 2, 4, 3])
    assert [(s.index, s.rank, s.lo, s.hi) for s in stages] == [
        (0, 0, 0, 1), (1, 1, 1, 3), (2, 2, 3, 7), (3, 3, 7, 10), (4, 0, 10, 10),
    ]
    assert [s.has_embed for s in stages] == [True, False, False, False, False]
    assert [s.has_head for s in stages] == [False, False, False, False, True]


def test_line_stages_uneven_and_single():
    stages = build_stages("line", [0, 2, 3])
    assert [(s.index, s.rank, s.lo, s.hi, s.has_embed, s.has_head) for s in stages] == [
        (0, 0, 0, 0, True, False),
        (1, 1, 0, 2, False, False),
        (2, 2, 2, 5, False, True),
    ]
    (only,) = build_stages("line", [4])
    assert (only.lo, only.hi, only.has_embed, only.has_head) == (0, 4, True, True)


@pytest.mark.parametrize(
    "mode, parts, match",
    [
        ("ring", [3], "at least 2"),
        ("line", [], "at least 1"),
        ("line", [2, -1], r"blocks_per_rank\[1\] must be >= 0, got -1"),
        ("line", [2, True], r"blocks_per_rank\[1\] must be an int"),
        ("line", "22", "list of ints"),
        ("tree", [1, 1], "mode must be one of"),
    ],
)
def test_build_stages_rejects_bad_arguments(mode, parts, match):
    with pytest.raises(ValueError, match=match):
        build_stages(mode, parts)


def test_does_backward_rule():
    ring = build_stages("ring", [2, 2, 2])  # stages 0..3, head at 3 with lo=hi=6
    flags = lambda f, head=False: [does_backward(s, f, head) for s in ring]  # noqa: E731
    assert flags(0) == [True, True, True, True]
    assert flags(1) == [True, True, True, True]  # frontier inside rank 0
    assert flags(2) == [False, True, True, True]  # exactly at a rank boundary
    assert flags(4) == [False, False, True, True]
    assert flags(6) == [False, False, False, False]
    assert flags(6, head=True) == [False, False, False, True]
    # An empty rank 0 has nothing to train even with everything trainable.
    assert [does_backward(s, 0) for s in build_stages("ring", [0, 2, 2])] == [False, True, True, True]


def test_empty_middle_stage_relays_gradient():
    plan = build_schedule("line", [2, 0, 2], 2, frontier=1)
    assert plan.backward == [True, True, True]
    grads = {(m.src, m.dst) for m in plan.messages() if m.kind == B}
    assert grads == {(2, 1), (1, 0)}
    plan = build_schedule("line", [2, 0, 2], 2, frontier=2)
    assert plan.backward == [False, False, True]
    assert not [m for m in plan.messages() if m.kind == B]


# ----------------------------------------------------------------- actions


def test_action_short_form():
    assert str(Action(F, 0, 3)) == "F0.3"
    assert str(Action(B, 2, 1)) == "B2.1"
    assert str(Action(SEND_F, 0, 3, 1)) == "sF0.3>1"
    assert str(Action(RECV_F, 1, 3, 0)) == "rF1.3<0"
    assert str(Action(SEND_B, 2, 0, 1)) == "sB2.0>1"
    assert str(Action(RECV_B, 1, 0, 2)) == "rB1.0<2"
    with pytest.raises(ValueError, match="kind"):
        Action("X", 0, 0)


def test_stage_orders():
    got = stage_order("1f1b", 0, 4, 6, True)
    assert got == [
        (F, 0), (F, 1), (F, 2),
        (F, 3), (B, 0), (F, 4), (B, 1), (F, 5), (B, 2),
        (B, 3), (B, 4), (B, 5),
    ]
    assert stage_order("1f1b", 3, 4, 3, True) == [(F, 0), (B, 0), (F, 1), (B, 1), (F, 2), (B, 2)]
    # Fewer micro-batches than warm-up slots: all forwards, then all backwards.
    assert stage_order("1f1b", 0, 5, 2, True) == [(F, 0), (F, 1), (B, 0), (B, 1)]
    assert stage_order("gpipe", 1, 3, 2, True) == [(F, 0), (F, 1), (B, 0), (B, 1)]
    assert stage_order("1f1b", 1, 3, 2, False) == [(F, 0), (F, 1)]


def test_line_format_exact():
    plan = build_schedule("line", [1, 1], 2, frontier=0)
    assert plan.format() == (
        "rank 0: F0.0 sF0.0>1 F0.1 sF0.1>1 rB0.0<1 B0.0 rB0.1<1 B0.1\n"
        "rank 1: rF1.0<0 F1.0 rF1.1<0 F1.1 B1.0 sB1.0>0 B1.1 sB1.1>0"
    )
    assert plan.format(compute_only=True).splitlines()[1] == "rank 1: F1.0 F1.1 B1.0 B1.1"


def test_ring_rank0_merge_prefers_backward_then_higher_stage():
    plan = build_schedule("ring", [1, 1], 2, frontier=0, schedule="1f1b")
    # Tick 5 offers B2.1 and B0.0: the head stage's backward goes first since
    # rank 1 waits for it; B0.0 feeds nobody.
    assert compute_line(plan, 0) == ["F0.0", "F0.1", "F2.0", "B2.0", "F2.1", "B2.1", "B0.0", "B0.1"]
    assert compute_line(plan, 1) == ["F1.0", "F1.1", "B1.0", "B1.1"]


# ------------------------------------------------------------------- grid


def _partitions(mode, n):
    if mode == "ring" and n < 2:
        return []
    parts = [[2] * n, [1] + [3] * (n - 1)]
    if n >= 2:
        parts.append([0] + list(range(1, n)))  # uneven, rank 0 empty
    return parts


def _grid():
    for mode in ("ring", "line"):
        for n in range(1, 6):
            for parts in _partitions(mode, n):
                yield mode, parts


def _expected_backward(stages, frontier, head_trainable, num_blocks):
    # The rule as stated for stages with blocks (only rank 0 is empty here).
    return [
        max(s.lo, frontier) < s.hi or (s.has_head and (frontier < num_blocks or head_trainable))
        for s in stages
    ]


@pytest.mark.parametrize("mode, parts", list(_grid()), ids=lambda v: str(v))
def test_grid_plans_are_valid_and_complete(mode, parts):
    num_blocks = sum(parts)
    stages = build_stages(mode, parts)
    n_stages = len(stages)
    boundary = parts[0] + parts[1] if len(parts) > 1 else parts[0]
    frontiers = sorted({0, num_blocks // 2, min(1, num_blocks), num_blocks, boundary})
    for m_count in (1, 2, 3, 5, 8):
        for frontier in frontiers:
            for head in (False, True):
                bwd = _expected_backward(stages, frontier, head, num_blocks)
                exp_grads = Counter(
                    (B, stages[s].rank, stages[s - 1].rank, s, m)
                    for s in range(1, n_stages)
                    if bwd[s - 1]
                    for m in range(m_count)
                )
                exp_acts = Counter(
                    (F, stages[s].rank, stages[s + 1].rank, s, m)
                    for s in range(n_stages - 1)
                    for m in range(m_count)
                )
                for sched in ("gpipe", "1f1b"):
                    ctx = (mode, parts, m_count, frontier, head, sched)
                    plan = build_schedule(mode, parts, m_count, frontier, head, sched)
                    plan.validate()
                    assert plan.backward == bwd, ctx
                    flat = [a for acts in plan.actions for a in acts]
                    kinds = Counter(a.kind for a in flat)
                    assert kinds[F] == n_stages * m_count, ctx
                    assert kinds[B] == sum(bwd) * m_count, ctx
                    msgs = Counter(tuple(m) for m in plan.messages())
                    assert Counter({k: v for k, v in msgs.items() if k[0] == B}) == exp_grads, ctx
                    assert Counter({k: v for k, v in msgs.items() if k[0] == F}) == exp_acts, ctx
                    assert kinds[RECV_B] == kinds[SEND_B] == sum(exp_grads.values()), ctx


def test_ring_frontier_example():
    plan = build_schedule("ring", [2, 2, 2], 3, frontier=4)
    assert plan.backward == [False, False, True, True]
    grads = [m for m in plan.messages() if m.kind == B]
    assert sorted(grads) == [Message(B, 0, 2, 3, m) for m in range(3)]
    assert not [a for a in plan.actions[1] if a.kind in (B, RECV_B, SEND_B)]
    # Rank 2 holds the frontier: it runs B but sends no gradient further down.
    assert [a.kind for a in plan.actions[2]].count(B) == 3
    assert not [a for a in plan.actions[2] if a.kind == SEND_B]


def test_ring_closing_edge():
    plan = build_schedule("ring", [1, 1, 1, 1], 1, frontier=0)
    msgs = set(plan.messages())
    assert Message(F, 3, 0, 3, 0) in msgs  # stage 3 (rank 3) -> head stage 4 (rank 0)
    assert Message(B, 0, 3, 4, 0) in msgs  # loss gradient back over the same edge
    assert Message(B, 1, 0, 1, 0) in msgs  # and finally into rank 0's blocks
    # Stage 0 and stage N share rank 0 but never talk to each other.
    assert not [m for m in msgs if m.src == m.dst]


def test_nothing_trainable_has_only_forwards():
    plan = build_schedule("ring", [1, 2], 4, frontier=3)
    assert plan.backward == [False, False, False]
    assert {a.kind for acts in plan.actions for a in acts} == {RECV_F, F, SEND_F}
    assert [m.kind for m in plan.messages()] == [F] * 8


def test_line_single_rank():
    plan = build_schedule("line", [3], 2, frontier=3, head_trainable=True)
    assert compute_line(plan, 0) == ["F0.0", "F0.1", "B0.0", "B0.1"]
    assert plan.messages() == []


# ------------------------------------------------------------------ memory


def _max_outstanding(plan, stage):
    live = peak = 0
    for a in plan.actions[plan.stages[stage].rank]:
        if a.stage == stage and a.kind == F:
            live += 1
        elif a.stage == stage and a.kind == B:
            live -= 1
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("mode, parts", [("line", [2, 2, 2, 2]), ("ring", [0, 2, 2, 2]), ("ring", [1, 1])])
@pytest.mark.parametrize("m_count", [1, 3, 8])
def test_1f1b_bounds_outstanding_activations(mode, parts, m_count):
    for frontier in (0, min(3, sum(parts) - 1)):
        one = build_schedule(mode, parts, m_count, frontier, schedule="1f1b")
        gp = build_schedule(mode, parts, m_count, frontier, schedule="gpipe")
        n_stages = one.num_stages
        for s in range(n_stages):
            if not one.backward[s]:
                continue
            assert _max_outstanding(one, s) == min(n_stages - s, m_count)
            assert _max_outstanding(gp, s) == m_count


# -------------------------------------------------------------- validation


def _broken(plan, rank, new_list):
    actions = [list(a) for a in plan.actions]
    actions[rank] = new_list
    return replace(plan, actions=actions)


def test_validate_catches_missing_recv():
    plan = build_schedule("line", [1, 1], 2, frontier=0)
    acts = [a for a in plan.actions[1] if str(a) != "rF1.1<0"]
    with pytest.raises(ValueError, match=r"activation of stage 0 mb 1 .*no matching RECV on rank 1"):
        _broken(plan, 1, acts).validate()


def test_validate_catches_cross_wait_deadlock():
    plan = build_schedule("line", [1, 1], 1, frontier=0)
    # rank 0: F0.0 sF0.0>1 rB0.0<1 B0.0; waiting for the gradient before
    # sending the activation makes both ranks receive first.
    acts = list(plan.actions[0])
    acts = [acts[2], acts[0], acts[1], acts[3]]
    assert [str(a) for a in acts] == ["rB0.0<1", "F0.0", "sF0.0>1", "B0.0"]
    with pytest.raises(DeadlockError, match=r"deadlock: rank 0 waits at action 0 \(rB0.0<1\); rank 1 waits"):
        _broken(plan, 0, acts).validate()
    with pytest.raises(DeadlockError):
        simulate(_broken(plan, 0, acts), unit)


def test_validate_catches_ring_order_deadlock():
    plan = build_schedule("ring", [1, 1], 2, frontier=0, schedule="gpipe")
    # Rank 1 waiting for the gradient of mb 0 before forwarding mb 0 is a
    # cycle through rank 0 (B2.0 needs F2.0, which needs rank 1's sF1.0),
    # although every per-action ordering check still holds.
    acts = list(plan.actions[1])
    i_recv_b = next(i for i, a in enumerate(acts) if a.kind == RECV_B)
    moved = [acts[i_recv_b]] + acts[:i_recv_b] + acts[i_recv_b + 1:]
    with pytest.raises(DeadlockError):
        _execute(_broken(plan, 1, moved).actions, unit, None)
    # (validate names the first thing wrong: rank 1 reads its channel from rank 0 out of order)
    with pytest.raises(ValueError, match="channel rank 0 -> 1 is not read in its sending order"):
        _broken(plan, 1, moved).validate()


@pytest.mark.parametrize("mode", ["ring", "line"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_every_channel_is_read_in_its_sending_order(mode, schedule):
    """What NCCL (which ignores tags) needs, and what the wire relies on: per (src, dst), the receives are in the
    order of the sends. The ring's rank 0 is where plans would break it without the reordering."""
    for n in range(2, 6):
        for m_count in (1, 2, 3, 5, 8):
            for frontier in range(0, n + 1):
                plan = build_schedule(mode, [1] * n, m_count, frontier, False, schedule)
                sent, received = {}, {}
                for r, acts in enumerate(plan.actions):
                    for a in acts:
                        if a.kind in (SEND_F, SEND_B):
                            sent.setdefault((r, a.peer), []).append((a.kind, a.stage, a.mb))
                        elif a.kind in (RECV_F, RECV_B):
                            # the sender's stage: the one below (activations) or above (gradients)
                            stage = a.stage - 1 if a.kind == RECV_F else a.stage + 1
                            received.setdefault((a.peer, r), []).append(
                                (SEND_F if a.kind == RECV_F else SEND_B, stage, a.mb))
                assert sent == received, (mode, schedule, n, m_count, frontier)


def test_a_channel_read_out_of_order_is_rejected():
    plan = build_schedule("line", [1, 1], 2, frontier=0)
    acts = list(plan.actions[1])  # rF1.0<0 F1.0 rF1.1<0 F1.1 ...: read mb 1 first
    acts = [acts[2], acts[0], acts[1], acts[3]] + acts[4:]
    with pytest.raises(ValueError, match=r"channel rank 0 -> 1 is not read in its sending order: message 0 sent"):
        _broken(plan, 1, acts).validate()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda acts: acts[:1] + acts, "duplicate F0.0"),
        (lambda acts: [a for a in acts if a.kind != B or a.mb != 1], "B0.1 is missing"),
        (lambda acts: [replace(a, peer=0) if a.kind == SEND_F else a for a in acts], "peer must be rank 1"),
        (lambda acts: [Action(F, 1, 0)] + acts, "stage 1 lives on rank 1"),
        (lambda acts: [Action(F, 0, 7)] + acts, "micro-batch out of range"),
        (lambda acts: acts[1:2] + acts[:1] + acts[2:], "sent before F0.0 computed it"),
        # rank 0 is F0.0 sF0.0>1 F0.1 sF0.1>1 rB0.0<1 B0.0 ...: swap rB0.0 and B0.0
        (
            lambda acts: acts[:4] + [acts[5], acts[4]] + acts[6:],
            r"gradient of stage 1 mb 0 .*received after B0.0",
        ),
    ],
)
def test_validate_catches_structural_errors(edit, match):
    plan = build_schedule("line", [1, 1], 2, frontier=0)
    with pytest.raises(ValueError, match=match):
        _broken(plan, 0, edit(list(plan.actions[0]))).validate()


def test_validate_catches_backward_on_frozen_stage():
    plan = build_schedule("line", [1, 1], 1, frontier=1)
    acts = list(plan.actions[0])
    acts.insert(-1, Action(B, 0, 0))
    with pytest.raises(ValueError, match="stage 0 does no backward at frontier 1"):
        _broken(plan, 0, acts).validate()
    sends = list(plan.actions[1])
    sends.insert(-1, Action(SEND_B, 1, 0, 0))
    with pytest.raises(ValueError, match="no such transfer"):
        _broken(plan, 1, sends).validate()


def test_validate_catches_wrong_number_of_ranks():
    plan = build_schedule("line", [1, 1], 1, frontier=0)
    with pytest.raises(ValueError, match="1 action lists for 2 ranks"):
        replace(plan, actions=plan.actions[:1]).validate()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(micro_batches=0), "micro_batches must be >= 1, got 0"),
        (dict(frontier=7), "frontier must be <= 4, got 7"),
        (dict(frontier=-1), "frontier must be >= 0, got -1"),
        (dict(schedule="zb"), "schedule must be one of"),
        (dict(head_trainable=1), "head_trainable must be a bool"),
    ],
)
def test_build_schedule_rejects_bad_arguments(kwargs, match):
    args = dict(mode="line", blocks_per_rank=[2, 2], micro_batches=2, frontier=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_schedule(**args)


# -------------------------------------------------------------- simulation


def test_simulate_line_gpipe_by_hand():
    # rank 0: F0.0 [0,1] F0.1 [1,2] .......... B0.0 [4,5] B0.1 [5,6]
    # rank 1:          F1.0 [1,2] F1.1 [2,3] B1.0 [3,4] B1.1 [4,5]
    plan = build_schedule("line", [1, 1], 2, frontier=0)
    res = simulate(plan, unit)
    assert res == {"finish": [6.0, 5.0], "busy": [4.0, 4.0], "idle": [2.0, 1.0], "makespan": 6.0}


def test_simulate_line_with_link_cost_by_hand():
    # Every transfer adds 0.5: rank 1 starts at 1.5, its first gradient leaves
    # at 4.5 and lands at 5.0, the second leaves at 5.5 and lands at 6.0.
    plan = build_schedule("line", [1, 1], 2, frontier=0)
    res = simulate(plan, unit, link_cost=lambda a: 0.5)
    assert res["finish"] == [7.0, 5.5]
    assert res["idle"] == [3.0, 1.5]
    assert res["makespan"] == 7.0


def test_simulate_ring_by_hand():
    # M=1: F0 F1 F2 B2 B1 B0 strictly one after the other over ranks 0,1,0,0,1,0.
    res = simulate(build_schedule("ring", [1, 1], 1, frontier=0), unit)
    assert res["makespan"] == 6.0
    assert res["busy"] == [4.0, 2.0]
    # M=2: rank 0 does 8 unit actions with no gap under either schedule.
    for sched in ("gpipe", "1f1b"):
        res = simulate(build_schedule("ring", [1, 1], 2, frontier=0, schedule=sched), unit)
        assert res == {"finish": [8.0, 7.0], "busy": [8.0, 4.0], "idle": [0.0, 3.0], "makespan": 8.0}


def test_simulate_line_1f1b_matches_gpipe_makespan():
    # Uniform-cost line pipelines: 1F1B has the same bubble as GPipe,
    # 2 * (M + S - 1) units when F and B both cost 1.
    for n in (2, 3, 4):
        for m_count in (1, 2, 5):
            spans = {
                sched: simulate(build_schedule("line", [1] * n, m_count, 0, schedule=sched), unit)["makespan"]
                for sched in ("gpipe", "1f1b")
            }
            assert spans == {"gpipe": 2.0 * (m_count + n - 1), "1f1b": 2.0 * (m_count + n - 1)}


def test_simulate_accounts_busy_plus_idle_and_rejects_negative_cost():
    plan = build_schedule("ring", [0, 2, 3], 4, frontier=1, schedule="1f1b")
    cost = lambda a: {F: 1.0, B: 2.5}[a.kind]  # noqa: E731
    res = simulate(plan, cost, link_cost=lambda a: 0.125)
    for r in range(plan.num_ranks):
        assert res["finish"][r] == pytest.approx(res["busy"][r] + res["idle"][r])
    assert res["makespan"] == max(res["finish"])
    assert res["busy"][1] == pytest.approx(4 * (1.0 + 2.5))
    with pytest.raises(ValueError, match="must be >= 0"):
        simulate(plan, lambda a: -1.0)


# ------------------------------------------------------- shared simulation


def _random_costs(plan, seed):
    """Per-action costs and link delays that differ everywhere (ties hide ordering mistakes)."""
    import random

    rng = random.Random(seed)
    table = {(a.kind, a.stage, a.mb): rng.uniform(0.1, 2.0) for acts in plan.actions for a in acts}
    return (lambda a: table[(a.kind, a.stage, a.mb)]), (lambda a: 0.3 * table[(a.kind, a.stage, a.mb)])


@pytest.mark.parametrize("mode,parts,m_count,frontier,schedule", [
    ("line", [1, 1], 2, 0, "gpipe"), ("line", [2, 1, 3], 5, 2, "1f1b"), ("line", [1, 0, 2, 1], 3, 0, "gpipe"),
    ("ring", [1, 1], 1, 0, "gpipe"), ("ring", [0, 2, 3], 4, 1, "1f1b"), ("ring", [2, 1, 1, 3], 6, 4, "1f1b"),
    ("ring", [1, 2, 2], 3, 5, "gpipe"),
])
def test_simulate_shared_without_sharing_is_simulate(mode, parts, m_count, frontier, schedule):
    plan = build_schedule(mode, parts, m_count, frontier, schedule=schedule)
    for seed in range(3):
        cost, link = _random_costs(plan, seed)
        ref = simulate(plan, cost, link)
        # a core per rank, or at least as many cores as ranks: the same numbers, bit for bit
        for cores in (None, plan.num_ranks, plan.num_ranks + 3):
            got = simulate_shared(plan.actions, cost, link, cores=cores)
            assert {k: got[k] for k in ref} == ref
            assert got["cpu"] == got["busy"]
    ref, got = simulate(plan, unit), simulate_shared(plan, unit)  # a Plan works as well as its lists
    assert {k: got[k] for k in ref} == ref and got["cpu"] == ref["busy"]
    assert got["utilization"] == pytest.approx(sum(ref["busy"]) / (plan.num_ranks * ref["makespan"]))


def test_simulate_shared_splits_cores_between_independent_ranks():
    two = [[Action(F, 0, 0)], [Action(F, 1, 0)]]
    one_core = simulate_shared(two, unit, cores=1)
    assert one_core == {"finish": [2.0, 2.0], "busy": [2.0, 2.0], "cpu": [1.0, 1.0], "idle": [0.0, 0.0],
                        "makespan": 2.0, "utilization": 1.0}
    assert simulate_shared(two, unit, cores=2)["finish"] == [1.0, 1.0]
    # rank 0 leaves after 1 unit of work at rate 1/2; rank 1 then has the core to itself for its last 2 units
    uneven = simulate_shared(two, lambda a: 1.0 if a.stage == 0 else 3.0, cores=1)
    assert uneven["finish"] == [2.0, 4.0] and uneven["busy"] == [2.0, 4.0] and uneven["cpu"] == [1.0, 3.0]


def test_simulate_shared_pipeline_on_two_cores_by_hand():
    # rank 0 computes 2 and sends to rank 1; rank 1 computes 1, then 1 on what it received; rank 2 computes 3.
    actions = [[Action(F, 0, 0), Action(SEND_F, 0, 0, 1)],
               [Action(F, 1, 1), Action(RECV_F, 1, 0, 0), Action(F, 1, 0)],
               [Action(F, 2, 0)]]
    work = {(0, 0): 2.0, (1, 1): 1.0, (1, 0): 1.0, (2, 0): 3.0}

    def cost(a):
        return work[(a.stage, a.mb)]

    # one core each: rank 1 waits for rank 0 from 1 to 2
    alone = simulate_shared(actions, cost)
    assert alone["finish"] == [2.0, 3.0, 3.0] and alone["idle"] == [0.0, 1.0, 0.0]
    # two cores: three ranks at rate 2/3 until rank 1's first unit ends at 1.5 (ranks 0 and 2 have done 1 each);
    # then rate 1: rank 0 ends at 2.5 and rank 1 receives, both rank 1 and rank 2 end at 3.5
    shared = simulate_shared(actions, cost, cores=2)
    assert shared["finish"] == pytest.approx([2.5, 3.5, 3.5])
    assert shared["busy"] == pytest.approx([2.5, 2.5, 3.5]) and shared["idle"] == pytest.approx([0.0, 1.0, 0.0])
    assert shared["cpu"] == [2.0, 2.0, 3.0] and shared["utilization"] == pytest.approx(1.0)  # both cores busy
    # a real plan: line [1, 1], 2 micro-batches, unit costs, on one core (12 units of work, never idle together)
    plan = build_schedule("line", [1, 1], 2, frontier=0)
    one = simulate_shared(plan, unit, cores=1)
    assert one["makespan"] == pytest.approx(8.0) and one["utilization"] == pytest.approx(1.0)
    assert simulate(plan, unit)["makespan"] == 6.0


def test_simulate_shared_slowdown_sleeps_without_a_core():
    single = [[Action(F, 0, 0)]]
    assert simulate_shared(single, unit, slowdown=[3.0]) == {
        "finish": [4.0], "busy": [4.0], "cpu": [1.0], "idle": [0.0], "makespan": 4.0, "utilization": 0.25}
    two = [[Action(F, 0, 0)], [Action(F, 1, 0)]]
    # sharing one core, rank 0's unit of work takes 2 s of wall time, so its sleep stretches to 6 s
    assert simulate_shared(two, unit, cores=1, slowdown=[3.0, 0.0])["finish"] == pytest.approx([8.0, 2.0])
    # rank 0 sleeps from 2 to 4 holding no core: rank 1 runs its last 2 units at full rate meanwhile
    long = simulate_shared(two, lambda a: 1.0 if a.stage == 0 else 3.0, cores=1, slowdown=[1.0, 0.0])
    assert long["finish"] == pytest.approx([4.0, 4.0]) and long["cpu"] == [1.0, 3.0]


def test_simulate_shared_message_cost_on_both_ends():
    actions = [[Action(F, 0, 0), Action(SEND_F, 0, 0, 1)], [Action(RECV_F, 1, 0, 0), Action(F, 1, 0)]]

    def msg(a):
        assert a.kind in (SEND_F, RECV_F)
        return 0.5

    # rank 0: F [0, 1], send [1, 1.5]; the message lands at 1.75; rank 1: receive [1.75, 2.25], F [2.25, 3.25]
    res = simulate_shared(actions, unit, lambda a: 0.25, msg_cost=msg)
    assert res["finish"] == [1.5, 3.25] and res["busy"] == [1.5, 1.5] and res["cpu"] == [1.5, 1.5]
    assert res["idle"] == [0.0, 1.75]
    # the emulation sleeps after compute only: a send is not stretched
    slow = simulate_shared(actions, unit, lambda a: 0.25, msg_cost=msg, slowdown=[1.0, 1.0])
    assert slow["finish"] == [2.5, 5.25] and slow["busy"] == [2.5, 2.5] and slow["cpu"] == [1.5, 1.5]


def test_simulate_shared_detects_deadlock_and_rejects_bad_arguments():
    plan = build_schedule("line", [1, 1], 1, frontier=0)
    acts = list(plan.actions[0])
    crossed = [[acts[2], acts[0], acts[1], acts[3]], plan.actions[1]]
    for cores in (None, 1):
        with pytest.raises(DeadlockError, match=r"deadlock: rank 0 waits at action 0 \(rB0.0<1\); rank 1 waits"):
            simulate_shared(crossed, unit, cores=cores)
    with pytest.raises(ValueError, match="cost.* must be >= 0"):
        simulate_shared(plan, lambda a: -1.0)
    with pytest.raises(ValueError, match="msg_cost.* must be >= 0"):
        simulate_shared(plan, unit, msg_cost=lambda a: float("nan"))
    with pytest.raises(ValueError, match="cores must be >= 1"):
        simulate_shared(plan, unit, cores=0)
    with pytest.raises(ValueError, match="slowdown must hold one value >= 0 per rank"):
        simulate_shared(plan, unit, slowdown=[0.0])


def test_simulate_shared_accounts_finish_as_busy_plus_idle_under_sharing():
    plan = build_schedule("ring", [0, 2, 3], 4, frontier=1, schedule="1f1b")
    cost, link = _random_costs(plan, 7)
    res = simulate_shared(plan, cost, link, cores=2, slowdown=[0.0, 1.5, 0.25], msg_cost=lambda a: 0.01)
    for r in range(plan.num_ranks):
        assert res["finish"][r] == pytest.approx(res["busy"][r] + res["idle"][r])
    assert res["makespan"] >= simulate(plan, cost, link)["makespan"]
    assert res["makespan"] >= sum(res["cpu"]) / 2 - 1e-9 and 0 < res["utilization"] <= 1


# ---------------------------------------------------------------- frontier


def test_trainable_blocks_and_frontier():
    assert trainable_blocks(0, 12, 2, 100, 2) == 2
    assert trainable_blocks(99, 12, 2, 100, 2) == 2
    assert trainable_blocks(100, 12, 2, 100, 2) == 4
    assert trainable_blocks(450, 12, 2, 100, 2) == 10
    assert trainable_blocks(10_000, 12, 2, 100, 2) == 12  # clamped at L
    assert trainable_blocks(5, 12, 2, 0, 2) == 12  # every == 0: everything
    assert trainable_blocks(500, 12, 3, 10, 0) == 3
    assert frontier_of(0, 12) == 12
    assert frontier_of(4, 12) == 8
    assert frontier_of(12, 12) == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: trainable_blocks(-1, 12, 2, 10, 2), "step must be >= 0, got -1"),
        (lambda: trainable_blocks(0, -3, 2, 10, 2), "num_blocks must be >= 0, got -3"),
        (lambda: trainable_blocks(0, 12, -2, 10, 2), "initial must be >= 0, got -2"),
        (lambda: trainable_blocks(0, 12, 2, -10, 2), "every must be >= 0, got -10"),
        (lambda: trainable_blocks(0, 12, 2, 10, -1), "increment must be >= 0, got -1"),
        (lambda: trainable_blocks(0, 12, 2.5, 10, 1), "initial must be an int, got 2.5"),
        (lambda: frontier_of(13, 12), "trainable must be <= 12, got 13"),
        (lambda: frontier_of(-1, 12), "trainable must be >= 0, got -1"),
    ],
)
def test_frontier_helpers_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _compute(plan, rank):
    return [(a.kind, a.stage, a.mb) for a in plan.actions[rank] if a.kind in (F, B)]


def _stage_orders(plan):
    """Each stage's compute order within its rank's list."""
    return [[(a.kind, a.mb) for a in plan.actions[st.rank] if a.kind in (F, B) and a.stage == st.index]
            for st in plan.stages]


def _lockstep(plan):
    """The same plan without head_cost: the unit-tick interleaving alone."""
    return build_schedule(plan.mode, [st.num_blocks for st in plan.stages[:plan.num_ranks]], plan.micro_batches,
                          plan.frontier, schedule=plan.schedule)


def test_ring_rank0_interleaves_its_stages_by_the_heads_cost():
    """With SmolLM2's head (16 block units: forward and backward), rank 0 runs three of a frozen stage 0's
    forwards before its first head, and keeps feeding stage 0 between heads; with stage 0 training too it
    fills the heads' waits with stage 0's backwards. Both finish well before the unit-tick interleaving under
    block-unit costs, each stage in its own 1F1B order. Only rank 0 has a choice."""
    for frontier, gain in ((22, 0.93), (0, 0.93)):
        plain = build_schedule("ring", [11, 19], 4, frontier, schedule="1f1b")
        heavy = build_schedule("ring", [11, 19], 4, frontier, schedule="1f1b", head_cost=16.0)
        assert _compute(heavy, 0)[:4] == [(F, 0, 0), (F, 0, 1), (F, 0, 2), (F, 2, 0)]
        assert _stage_orders(heavy) == _stage_orders(plain)
        assert _compute(heavy, 1) == _compute(plain, 1)  # its receives follow the sends
        cost = block_unit_cost(heavy.stages, frontier, 16.0)
        assert simulate(heavy, cost)["makespan"] < gain * simulate(plain, cost)["makespan"]
    full = build_schedule("ring", [11, 19], 4, 0, schedule="1f1b", head_cost=16.0)
    assert (B, 0, 0) in _compute(full, 0)[:8]  # a backward of stage 0 before the third head
    # a free head: the unit-tick order is as fast as any candidate and is kept
    cheap = build_schedule("ring", [1, 1], 12, 1, schedule="1f1b", head_cost=0.0)
    assert cheap.actions == build_schedule("ring", [1, 1], 12, 1, schedule="1f1b").actions
    # line: rank 0 holds stage 0 alone
    line = build_schedule("line", [19, 11], 4, 22, schedule="1f1b", head_cost=16.0)
    assert line.actions == build_schedule("line", [19, 11], 4, 22, schedule="1f1b").actions


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_ring_plans_by_head_cost_keep_stage_orders_and_never_lose(schedule):
    """Over ring shapes, micro-batch counts, frontiers and head costs: every plan is valid (build_schedule
    validates it), each stage runs in its own order (so its activations stay within the schedule's bound), and
    it is never slower under block-unit costs than the unit-tick interleaving."""
    for parts in ([1, 1], [2, 3], [3, 2], [0, 2, 3], [1, 2, 2, 1], [2, 1, 1, 1, 1]):
        num_blocks = sum(parts)
        for micro_batches in (1, 2, 3, 5, 8):
            for frontier in sorted({0, max(parts[0] - 1, 0), parts[0], num_blocks - 1}):
                for head_cost in (0.0, 2.0, 16.0):
                    plan = build_schedule("ring", parts, micro_batches, frontier, schedule=schedule,
                                          head_cost=head_cost)
                    plain = _lockstep(plan)
                    assert _stage_orders(plan) == _stage_orders(plain)
                    cost = block_unit_cost(plan.stages, frontier, head_cost)
                    assert simulate(plan, cost)["makespan"] <= simulate(plain, cost)["makespan"] + 1e-9


def test_ring_rank0_order_is_near_the_best_interleaving():
    """Small rings, every interleaving of rank 0's two stage orders tried: the plan chosen is within 12% of the
    fastest valid one under block-unit costs (measured over a wider sweep: at most 1.12x, mostly exact)."""
    from itertools import combinations

    from ringada.schedule import PlanError, _actions, _backward_flags, Plan

    for parts, micro_batches, frontier, head_cost in (([2, 3], 3, 0, 8.0), ([2, 3], 3, 3, 16.0),
                                                      ([1, 2, 2], 3, 0, 16.0), ([3, 2], 3, 3, 2.0)):
        plan = build_schedule("ring", parts, micro_batches, frontier, schedule="1f1b", head_cost=head_cost)
        stages, cost = plan.stages, block_unit_cost(plan.stages, frontier, head_cost)
        bwd = _backward_flags(stages, frontier, False)
        first = [(k, 0, m) for k, m in _stage_orders(plan)[0]]
        last = [(k, len(stages) - 1, m) for k, m in _stage_orders(plan)[-1]]
        others = [[(a.kind, a.stage, a.mb) for a in acts if a.kind in (F, B)] for acts in plan.actions[1:]]
        best = float("inf")
        for slots in combinations(range(len(first) + len(last)), len(last)):
            a, b = iter(first), iter(last)
            rank0 = [next(b) if i in slots else next(a) for i in range(len(first) + len(last))]
            trial = Plan(stages=stages, num_ranks=len(parts), micro_batches=micro_batches, frontier=frontier,
                         schedule="1f1b", mode="ring", actions=_actions(stages, bwd, [rank0] + others))
            try:
                trial.validate()
            except PlanError:
                continue
            best = min(best, simulate(trial, cost)["makespan"])
        assert simulate(plan, cost)["makespan"] <= 1.12 * best


def test_ring_rank0_order_weighs_each_ranks_speed():
    """ring4.yaml's split and speeds (hub 1, phone 0.3, tablet 0.5, laptop 1): with the speeds, the order chosen
    is faster under the speed-weighted costs than the one chosen as if all ranks were equal; ranks of equal
    speed change nothing."""
    speeds = [1.0, 0.3, 0.5, 1.0]
    for head_cost in (12.0, 15.0):
        equal = build_schedule("ring", [14, 3, 5, 8], 4, 22, schedule="1f1b", head_cost=head_cost)
        timed = build_schedule("ring", [14, 3, 5, 8], 4, 22, schedule="1f1b", head_cost=head_cost, speeds=speeds)
        cost = block_unit_cost(timed.stages, 22, head_cost, speeds)
        assert simulate(timed, cost)["makespan"] < 0.93 * simulate(equal, cost)["makespan"]
    same = build_schedule("ring", [14, 3, 5, 8], 4, 22, schedule="1f1b", head_cost=15.0, speeds=[2.0] * 4)
    assert same.actions == build_schedule("ring", [14, 3, 5, 8], 4, 22, schedule="1f1b", head_cost=15.0).actions
    with pytest.raises(ValueError, match="one value > 0 per rank"):
        build_schedule("ring", [14, 3, 5, 8], 4, 22, head_cost=15.0, speeds=[1.0, 0.0, 1.0, 1.0])
