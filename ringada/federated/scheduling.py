"""Order in which the `sfl` server serves devices, as pure functions.

Device u becomes ready at its release time r_u (device forward + uplink), needs p_u of server time, and then a
tail q_u (downlink + device backward) that overlaps with the server serving others. The server serves one device
at a time; the round ends when the last tail ends. Minimize the makespan max_u (C_u + q_u), C_u the server
completion time of u. (Single-machine scheduling with release times and delivery times, 1|r_j|L_max-like.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

POLICIES = ("fifo", "heuristic", "optimal")
MAX_OPTIMAL = 8


def makespan(order: Sequence[int], release: Sequence[float], server: Sequence[float], tail: Sequence[float]) -> float:
    """Makespan of serving ``order`` (indices into the time lists)."""
    t, end = 0.0, 0.0
    for u in order:
        t = max(t, release[u]) + server[u]
        end = max(end, t + tail[u])
    return end


def fifo(release, server, tail) -> list[int]:
    """Serve in release order (ties by index)."""
    return sorted(range(len(release)), key=lambda u: (release[u], u))


def largest_tail_first(release, server, tail) -> list[int]:
    """Whenever the server is free, serve the released device with the largest tail (Schrage's rule); if none is
    released yet, wait for the earliest release."""
    pending = set(range(len(release)))
    order, t = [], 0.0
    while pending:
        ready = [u for u in pending if release[u] <= t]
        if not ready:
            t = min(release[u] for u in pending)
            continue
        u = max(ready, key=lambda v: (tail[v], -release[v], -v))
        order.append(u)
        pending.remove(u)
        t += server[u]
    return order


def optimal(release, server, tail) -> list[int]:
    """Exhaustive search (up to 8 devices); ties keep the lexicographically first order."""
    n = len(release)
    if n > MAX_OPTIMAL:
        raise ValueError(f"star.schedule: optimal searches all orders and handles at most {MAX_OPTIMAL} devices per "
                         f"round, got {n}; use heuristic")
    best, best_order = float("inf"), list(range(n))
    for order in itertools.permutations(range(n)):
        value = makespan(order, release, server, tail)
        if value < best - 1e-12:
            best, best_order = value, list(order)
    return best_order


def server_order(policy: str, release, server, tail) -> list[int]:
    if len({len(release), len(server), len(tail)}) != 1:
        raise ValueError("release, server and tail times must have one entry per device")
    return {"fifo": fifo, "heuristic": largest_tail_first, "optimal": optimal}[policy](release, server, tail)
