"""Pure parts of the wire format and the partition solver (no processes)."""

import itertools

import pytest
import torch

from ringada import comm
from ringada.models import parameter_counts
from ringada.partition import balanced_partition, block_ranges, even_partition, head_cost_in_blocks


def test_header_round_trip_for_every_dtype_and_rank():
    tensors = [torch.zeros(2, 3, 4, dtype=torch.float32), torch.ones(5, dtype=torch.int64),
               torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)]
    kind, step, mb, specs = comm.decode_header(comm.encode_header(comm.GRAD, 17, 5, tensors))
    assert (kind, step, mb) == (comm.GRAD, 17, 5)
    assert specs == [(t.dtype, tuple(t.shape)) for t in tensors]
    assert comm.encode_header(comm.ACT, 0, 0, []).numel() * 8 == comm.HEADER_BYTES


def test_header_rejects_what_it_cannot_carry():
    with pytest.raises(ValueError, match="at most 3 tensors"):
        comm.encode_header(comm.ACT, 0, 0, [torch.zeros(1)] * 4)
    with pytest.raises(ValueError, match="at most 4"):
        comm.encode_header(comm.ACT, 0, 0, [torch.zeros(1, 1, 1, 1, 1)])
    bad = comm.encode_header(comm.ACT, 0, 0, [])
    bad[0] = 7
    with pytest.raises(RuntimeError, match="corrupt"):
        comm.decode_header(bad)


def test_counters_of_several_links_add_up():
    a, b = comm.Counters(), comm.Counters()
    a.add("sent", comm.ACT, 100)
    a.add("recv", comm.GRAD, 40)
    b.add("sent", comm.ACT, 10)
    b.add("sent", comm.ADAPTERS, 5)
    total = comm.Counters.total([a, b])
    assert (total.bytes_sent, total.bytes_recv, total.messages_sent, total.messages_recv) == (115, 40, 3, 1)
    assert total.sent_by_kind == {"activation": [2, 110], "adapters": [1, 5]}
    assert total.recv_by_kind == {"gradient": [1, 40]}


def test_a_wire_releases_only_the_sends_it_is_told_were_taken_and_counts_what_it_holds(monkeypatch):
    """gloo tells a send is done only once it is waited on: the wire waits on (and frees) exactly the sends of
    the micro-batch's earlier steps, and every other one at flush."""

    class Work:
        waited = False

        def wait(self, timeout=None):
            self.waited = True

    works, wire, msg = [], comm.Wire(0), comm.HEADER_BYTES + 4 * 4
    monkeypatch.setattr(comm.dist, "isend", lambda *args, **kwargs: works.append(Work()) or works[-1])
    sent = [(step, mb) for step in range(3) for mb in range(2)]
    for step, mb in sent:
        wire.send(1, comm.ACT, step, mb, [torch.ones(4)])  # a header and a tensor: two sends each

    def waited():
        return {sent[i // 2] for i, w in enumerate(works[:12]) if w.waited}

    assert len(works) == 12 and wire.held_peak_bytes == 6 * msg and not waited()
    wire.release(0, 2)
    assert waited() == {(0, 0), (1, 0)}
    wire.release(0, 2)  # nothing more there
    wire.send(1, comm.ACT, 3, 0, [torch.ones(4)])
    assert wire.held_peak_bytes == 6 * msg  # the released bytes made room
    wire.flush()
    assert all(w.waited for w in works)
    wire.send(1, comm.ACT, 4, 0, [torch.ones(4)])
    assert wire.held_peak_bytes == 6 * msg  # flush freed everything


def test_state_packs_into_three_tensors_and_back():
    state = {"b.weight": torch.randn(3, 4), "a.bias": torch.randn(7), "c.scalar": torch.tensor(2.5)}
    packed = comm.pack_state(state)
    assert [t.dtype for t in packed] == [torch.uint8, torch.int64, torch.float32]
    back = comm.unpack_state(packed)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert comm.unpack_state(comm.pack_state({})) == {}


def _brute_force(num_blocks, extra, minimum):
    best = None
    for split in itertools.product(range(num_blocks + 1), repeat=len(extra)):
        if sum(split) != num_blocks or any(b < m for b, m in zip(split, minimum)):
            continue
        load = max(e + b for e, b in zip(extra, split))
        best = load if best is None else min(best, load)
    return best


@pytest.mark.parametrize("num_blocks", [1, 4, 7, 12])
@pytest.mark.parametrize("extra", [[0, 0], [3.5, 0, 0], [8, 0, 0, 0], [0, 1, 0, 2.5], [12, 0, 0]])
def test_balanced_partition_is_optimal(num_blocks, extra):
    minimum = [0] + [1] * (len(extra) - 1)
    if sum(minimum) > num_blocks:
        with pytest.raises(ValueError, match="at least"):
            balanced_partition(num_blocks, extra, minimum)
        return
    split = balanced_partition(num_blocks, extra, minimum)
    assert sum(split) == num_blocks and all(b >= m for b, m in zip(split, minimum))
    assert max(e + b for e, b in zip(extra, split)) == _brute_force(num_blocks, extra, minimum)


def test_even_partition_puts_the_head_cost_on_the_right_rank():
    # the head's 16 units (forward and backward) weigh as 8 blocks, each block counting its forward and backward
    assert even_partition(30, 4, "ring", head_cost=16.0) == [2, 10, 9, 9]
    assert even_partition(30, 4, "line", head_cost=16.0) == [10, 10, 9, 1]  # loads 10, 10, 9, 9
    assert even_partition(4, 4, "ring", head_cost=40.0) == [0, 2, 1, 1]
    assert even_partition(8, 2, "ring", head_cost=0.0) == [4, 4]
    assert block_ranges([2, 0, 3]) == [(0, 2), (2, 2), (2, 5)]


def _brute_capacity(num_blocks, cost, extra, cap, minimum):
    best = None
    for split in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(minimum, cap))):
        if sum(split) == num_blocks:
            value = max(e + b * c for b, c, e in zip(split, cost, extra))
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_capacity_partition_is_optimal_under_memory_limits(seed):
    import random

    from ringada.partition import capacity_partition, stage_times

    rng = random.Random(seed)
    world = rng.randint(2, 4)
    num_blocks = rng.randint(world, 9)
    cost = [rng.uniform(0.5, 3.0) for _ in range(world)]
    extra = [rng.uniform(0, 4.0) if r == 0 else 0.0 for r in range(world)]
    cap = [rng.randint(1, num_blocks) for _ in range(world)]
    minimum = [0] + [1] * (world - 1)
    if sum(cap) < num_blocks:
        with pytest.raises(ValueError, match="no split fits"):
            capacity_partition(num_blocks, cost, extra, cap, minimum)
        return
    split = capacity_partition(num_blocks, cost, extra, cap, minimum)
    assert sum(split) == num_blocks and all(lo <= b <= hi for b, lo, hi in zip(split, minimum, cap))
    assert max(stage_times(split, cost, extra)) == pytest.approx(_brute_capacity(num_blocks, cost, extra, cap,
                                                                                 minimum))


def test_search_partition_finds_every_best_split_of_two_ranks_and_respects_the_bounds():
    from ringada.partition import search_partition

    # a local minimum at [6, 4], where moving one block at a time would stop; the best is [9, 1]
    times = {6: 3.3, 5: 3.5, 7: 3.7, 8: 3.5, 9: 3.0, 4: 3.9, 3: 4.0, 2: 4.1, 1: 4.2}
    calls = []

    def predict(split):
        calls.append(list(split))
        return times[split[0]]

    assert search_partition([5, 5], predict, [1, 1]) == ([9, 1], 3.0)
    assert len(calls) == len({tuple(c) for c in calls}) == 9  # each split predicted once
    assert search_partition([5, 5], predict, [1, 1], max_blocks=[8, 9]) == ([6, 4], 3.3)  # [9, 1] does not fit
    # an equal prediction never replaces the start
    assert search_partition([5, 5], lambda split: 1.0, [1, 1]) == ([5, 5], 1.0)


@pytest.mark.parametrize("seed", range(12))
def test_search_partition_reaches_the_best_split_of_a_separable_cost(seed):
    """Where the time is a sum of convex per-rank terms, no re-split of a pair improving means the optimum."""
    import random

    from ringada.partition import search_partition

    rng = random.Random(seed)
    world, num_blocks = rng.randint(2, 4), rng.randint(6, 12)
    weight = [rng.uniform(0.5, 3.0) for _ in range(world)]
    target = [rng.uniform(0, num_blocks) for _ in range(world)]

    def predict(split):
        return sum(w * (b - t) ** 2 for w, b, t in zip(weight, split, target))

    minimum = [0] + [1] * (world - 1)
    start = [num_blocks - world + 1] + [1] * (world - 1)
    split, value = search_partition(start, predict, minimum)
    best = min(predict(list(p)) for p in itertools.product(range(num_blocks + 1), repeat=world)
               if sum(p) == num_blocks and all(b >= lo for b, lo in zip(p, minimum)))
    assert sum(split) == num_blocks and value == pytest.approx(best)


def test_capacity_partition_errors_name_the_problem():
    from ringada.partition import capacity_partition

    with pytest.raises(ValueError, match=r"rank 1 must hold at least 1 block\(s\) but its memory budget fits 0"):
        capacity_partition(4, [1, 1], [0, 0], [4, 0], [0, 1])


def test_head_cost_counts_the_heads_forward_and_input_gradient():
    """SmolLM2's LM head (vocab x hidden, tied) is about 8 blocks' parameters; its forward and the gradient
    of its input (the head is frozen) count twice that, which `even` weighs against blocks that also run
    forward and backward: the README's splits."""
    sizes = parameter_counts("smollm2")
    cost = head_cost_in_blocks("smollm2")
    assert cost == pytest.approx(2 * sizes["vocab"] * sizes["hidden"] / sizes["block"], rel=1e-4)  # + final norm
    assert 15 < cost < 17
    assert even_partition(30, 2, "ring", cost) == [11, 19]
    assert even_partition(30, 4, "ring", cost) == [2, 10, 9, 9]
    assert head_cost_in_blocks("smollm2", "classification", 3) == 0.0
