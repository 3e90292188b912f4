"""Pure star-mode logic: aggregation, server ordering, selection and mobility."""

import itertools
import math
import random

import pytest
import torch

from ringada.federated.aggregate import aggregate
from ringada.federated.scheduling import largest_tail_first, makespan, optimal, server_order
from ringada.federated.selection import Mobility, Selector, steps_before_leaving


def test_aggregate_is_example_weighted_per_key_over_heterogeneous_depths():
    # device 0 holds block 0 locally; device 1 has block 0 too; block 1 lives on the server for device 1 only
    a0, a1, b1 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), torch.tensor([5.0])
    views = [(1.0, {"l.0.A": a0}), (3.0, {"l.0.A": a1, "l.1.A": b1})]
    out = aggregate(views)
    torch.testing.assert_close(out["l.0.A"], (1 * a0 + 3 * a1) / 4)
    torch.testing.assert_close(out["l.1.A"], b1)  # only one holder: unchanged


def test_aggregate_of_identical_views_is_exact_and_a_single_view_is_identity():
    state = {"k": torch.randn(4, 3), "j": torch.randn(2)}
    assert all(torch.equal(aggregate([(7.0, state)])[k], state[k]) for k in state)
    averaged = aggregate([(2.0, state), (5.0, state)])
    torch.testing.assert_close(averaged["k"], state["k"], rtol=1e-7, atol=0)


def test_aggregate_averages_lora_factors_separately():
    A1, B1, A2, B2 = (torch.randn(2, 2) for _ in range(4))
    out = aggregate([(1.0, {"A": A1, "B": B1}), (1.0, {"A": A2, "B": B2})])
    torch.testing.assert_close(out["A"], (A1 + A2) / 2)
    assert not torch.allclose(out["B"] @ out["A"], (B1 @ A1 + B2 @ A2) / 2)


def test_aggregate_rejects_bad_input():
    with pytest.raises(ValueError, match="no device views"):
        aggregate([])
    with pytest.raises(ValueError, match="shape"):
        aggregate([(1.0, {"k": torch.zeros(2)}), (1.0, {"k": torch.zeros(3)})])


def test_makespan_by_hand():
    # r = (0, 1), p = (2, 2), q = (1, 5): order (0, 1): C0 = 2, C1 = 4 -> max(3, 9) = 9; order (1, 0): C1 = 3,
    # C0 = 5 -> max(8, 6) = 8
    assert makespan([0, 1], [0, 1], [2, 2], [1, 5]) == 9
    assert makespan([1, 0], [0, 1], [2, 2], [1, 5]) == 8
    assert optimal([0, 1], [2, 2], [1, 5]) == [1, 0]


def _instances(n, count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        yield ([rng.uniform(0, 5) for _ in range(n)], [rng.uniform(0.5, 3) for _ in range(n)],
               [rng.uniform(0, 6) for _ in range(n)])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_optimal_matches_brute_force_and_bounds_the_others(n):
    for r, p, q in _instances(n, 20, n):
        best = min(makespan(o, r, p, q) for o in itertools.permutations(range(n)))
        assert makespan(optimal(r, p, q), r, p, q) == pytest.approx(best)
        for policy in ("fifo", "heuristic"):
            order = server_order(policy, r, p, q)
            assert sorted(order) == list(range(n))
            assert makespan(order, r, p, q) >= best - 1e-9


def test_heuristic_beats_fifo_on_average_and_serves_released_largest_tail_first():
    gains = [makespan(server_order("fifo", r, p, q), r, p, q) - makespan(largest_tail_first(r, p, q), r, p, q)
             for r, p, q in _instances(6, 200, 1)]
    assert sum(gains) > 0
    # all released at 0: largest tail first
    assert largest_tail_first([0, 0, 0], [1, 1, 1], [1, 9, 4]) == [1, 2, 0]
    # device 2 releases late: the server does not wait for it
    assert largest_tail_first([0, 0, 10], [1, 1, 1], [1, 2, 99])[:2] == [1, 0]


def test_optimal_refuses_more_than_eight_devices():
    with pytest.raises(ValueError, match="at most 8"):
        optimal([0] * 9, [1] * 9, [1] * 9)


def test_mobility_and_steps_before_leaving():
    rng = random.Random(0)
    assert Mobility("none").dwell_times(rng, [1, 2]) == {1: math.inf, 2: math.inf}
    draws = [Mobility("exponential", 4.0).dwell_times(random.Random(s), [1])[1] for s in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(4.0, rel=0.06)
    assert all(0 <= d <= 8 for d in (Mobility("uniform", 4.0).dwell_times(random.Random(s), [1])[1]
                                     for s in range(200)))
    assert steps_before_leaving(math.inf, 1.0, 5) == 5
    assert steps_before_leaving(3.5, 1.0, 5) == 3
    assert steps_before_leaving(0.2, 1.0, 5) == 0


def test_selection_policies():
    devices = [1, 2, 3, 4, 5]
    assert Selector("all", 0).select(0, devices) == devices
    rnd = Selector("random", 2, seed=3)
    picks = [tuple(rnd.select(t, devices)) for t in range(30)]
    assert all(len(p) == 2 for p in picks) and len(set(picks)) > 3
    assert picks == [tuple(Selector("random", 2, seed=3).select(t, devices)) for t in range(30)]


def test_ucb_tries_everyone_then_prefers_reliable_fast_devices():
    ucb = Selector("ucb", 2, c=0.1)
    tried = set()
    for t in range(3):
        chosen = ucb.select(t, [1, 2, 3, 4])
        tried |= set(chosen)
        for u in chosen:  # device 4 always drops out, device 3 is slow
            ucb.record(u, finished=u != 4, loss=1.0, delay=10.0 if u == 3 else 1.0)
    assert tried == {1, 2, 3, 4}
    for t in range(3, 20):
        chosen = ucb.select(t, [1, 2, 3, 4])
        for u in chosen:
            ucb.record(u, finished=u != 4, loss=1.0, delay=10.0 if u == 3 else 1.0)
    counts = {u: ucb.stats[u].selected for u in (1, 2, 3, 4)}
    assert counts[1] > counts[4] and counts[2] > counts[4] and counts[1] > counts[3]
