"""Per-round resource allocation for split fine-tuning (SFT) over one edge server, as pure logic.

U devices share one server. Device u runs the lower ``d_u`` of the model's L blocks, compresses the
activation at its cut ("smashed data") with a top-k keep ratio ``rho_u`` and sends it over its share ``b_u``
of a shared uplink of rate B (bytes/s). The server runs the remaining ``L - d_u`` blocks of every device in
one batch and sends the activation gradients back over a shared downlink of rate D. The model follows
arXiv 2501.09237 in spirit, simplified to the following documented choices.

Round delay (the objective, exactly what :func:`round_delay` computes)::

    T = max_u ( d_u * block_time_u + act_bytes_u * rho_u / b_u )      device compute + uplink
        + server_block_time * sum_u (L - d_u)                         server compute
        + sum_u act_bytes_u / D                                       downlink

* Device compute (forward and backward of its blocks) is charged once, before the uplink; overlap of
  compute with communication is ignored.
* Uplink bytes scale linearly with the keep ratio (index overhead folded into ``act_bytes``). A device with
  nothing to send (``act_bytes_u * rho_u == 0``) has no uplink term whatever its bandwidth; one with
  bytes to send and ``b_u <= 0`` never finishes (``T = inf``).
* The cut activation of a transformer has the same size after every block, so ``act_bytes_u`` does not
  depend on ``d_u``.
* Downlink: gradients are as large as the uncompressed activations and share the downlink equally
  (processor sharing); the last byte of any work-conserving sharing leaves at ``sum_u act_bytes_u / D``.
  That term is a constant: it enters the reported delay but never a decision.

Constraints::

    base_memory_u + d_u * block_memory <= memory_budget_u        (memory)
    sum_u err_weight_u * (1 - rho_u)   <= error_budget           (compression error)
    sum_u b_u <= B,  b_u >= 0,  rho_min <= rho_u <= 1,  d_u integer in [1, L - 1]

The compression error ``e_u(rho) = (1 - rho) * err_weight_u`` models the fraction of activation energy a
top-k sparsifier drops as linear in the dropped fraction; ``err_weight_u`` expresses how much device u's
error matters (its data share, say). Top-k keeps the largest entries, so it never drops more than that
fraction of the energy: the linear model is conservative. Being linear, it tends to concentrate compression
on few devices; a heavily compressed device then has time to spare for compute, so at a binding budget a
slower device can end up with more blocks than a faster one with identical memory and bytes.

Note (calibrated error). A device whose codec comes in discrete settings (bits per value, say) gives measured
(bytes ratio, error) points instead, e.g. the relative increase of the held-out loss when its cut activations
travel through each setting. Its error is then the lower convex hull of those points and (1, 0), restricted to
where it decreases: a convex piecewise-linear e_u(rho) = max_k (alpha_k + beta_k rho) on [r_min, 1]. The
continuous part stays a convex program (one epigraph variable per device, a linear constraint per piece), and
:func:`snap_to_settings` rounds each keep ratio up to the next hull vertex, i.e. to a real setting: more
bytes, so no more error than planned (the hull is decreasing), at a slightly longer delay, which it recomputes.

Method. For fixed depths the continuous part (rho, b, T) is solved with SLSQP on the epigraph form, started
from the best of a few feasible heuristics; the result is then polished: its keep ratios are made exactly
feasible and the bandwidth is replaced by the optimal split for them, which has a closed form up to one
scalar root (found with ``scipy.optimize.brentq``). Depths are searched exactly (branch and bound over all
depth vectors) when there are at most ``max_enumeration`` of them, otherwise by coordinate descent; see
:func:`allocate` for the limits.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, linprog, minimize

__all__ = [
    "Allocation",
    "AllocationProblem",
    "DeviceProfile",
    "allocate",
    "convex_error_curve",
    "max_depths",
    "round_delay",
    "snap_to_settings",
]


def _finite_nonneg(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")


@dataclass(frozen=True)
class DeviceProfile:
    """One device: seconds per block (forward + backward), memory in bytes, uplink bytes at rho = 1."""

    block_time: float
    memory_budget: float
    base_memory: float
    act_bytes: float
    err_weight: float = 1.0
    err_curve: tuple[tuple[float, float], ...] = ()
    """Measured (bytes ratio, error) points of the device's codec settings, e.g. (0.09, 0.008) for one that
    sends 9% of the bytes and raises the held-out loss by 0.8%; (1, 0) is implied. When given, the device's
    error is this curve (Note: calibrated error) instead of ``err_weight * (1 - rho)``, and its keep ratio stays
    within the measured range."""

    def __post_init__(self) -> None:
        for name in ("block_time", "memory_budget", "base_memory", "act_bytes", "err_weight"):
            _finite_nonneg(name, getattr(self, name))
        points = tuple((float(r), float(e)) for r, e in self.err_curve)
        for r, e in points:
            if not (0 < r <= 1 and math.isfinite(e) and e >= 0):
                raise ValueError(f"err_curve point ({r!r}, {e!r}) must have a bytes ratio in (0, 1] and an error "
                                 ">= 0")
        object.__setattr__(self, "err_curve", points)


@dataclass(frozen=True)
class AllocationProblem:
    """One round's instance: devices, an L-block model, the shared links and the server, the error budget.

    ``uplink`` and ``downlink`` are rates in bytes/s, ``block_memory`` bytes per block on a device,
    ``server_block_time`` seconds per block per device batch.
    """

    devices: tuple[DeviceProfile, ...]
    num_blocks: int
    block_memory: float
    uplink: float
    downlink: float
    server_block_time: float
    error_budget: float
    rho_min: float = 0.01

    def __post_init__(self) -> None:
        # Lists are accepted for convenience, but the instance must stay hashable and immutable.
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.devices:
            raise ValueError("an allocation problem needs at least one device")
        for u, dev in enumerate(self.devices):
            if not isinstance(dev, DeviceProfile):
                raise ValueError(f"device {u} is a {type(dev).__name__}, not a DeviceProfile")
        if isinstance(self.num_blocks, bool) or int(self.num_blocks) != self.num_blocks or self.num_blocks < 2:
            raise ValueError(f"num_blocks={self.num_blocks!r} must be an integer >= 2 so each side runs a block")
        object.__setattr__(self, "num_blocks", int(self.num_blocks))
        _finite_nonneg("block_memory", self.block_memory)
        _finite_nonneg("server_block_time", self.server_block_time)
        for name in ("uplink", "downlink"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a finite rate > 0 (bytes/s)")
        if not math.isfinite(self.error_budget):
            raise ValueError(f"error_budget={self.error_budget!r} must be finite")
        if not (0.0 <= self.rho_min <= 1.0):
            raise ValueError(f"rho_min={self.rho_min!r} must lie in [0, 1]")


@dataclass(frozen=True)
class Allocation:
    """Per-device depth, keep ratio and uplink bandwidth (bytes/s), and the resulting round delay (s)."""

    depths: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    bandwidth: tuple[float, ...]
    round_delay: float


# ----------------------------------------------------------------------------------------------- objective


def _as_vector(name: str, values, n: int) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"{name} has shape {arr.shape}, expected one value per device ({n})")
    return arr


def round_delay(problem: AllocationProblem, depths, keep_ratios, bandwidth) -> float:
    """The round delay T of a decision (see the module docstring for the formula), in seconds.

    Only the objective: memory, error and bandwidth-sum constraints are not checked here. Depths must be
    integers in [1, L - 1] because the server term assumes each side runs at least one block.
    """
    n, L = len(problem.devices), problem.num_blocks
    d = _as_vector("depths", depths, n)
    if np.any(d != np.round(d)) or np.any(d < 1) or np.any(d > L - 1):
        raise ValueError(f"depths {tuple(depths)} must be integers in [1, {L - 1}]")
    rho = _as_vector("keep_ratios", keep_ratios, n)
    b = _as_vector("bandwidth", bandwidth, n)
    t = np.array([dev.block_time for dev in problem.devices])
    a = np.array([dev.act_bytes for dev in problem.devices])
    device_phase = max(
        d[u] * t[u] + _uplink_time(a[u] * rho[u], b[u]) for u in range(n)
    )
    return float(device_phase + _server_time(problem, d) + _downlink_time(problem))


def _uplink_time(nbytes: float, rate: float) -> float:
    if nbytes <= 0:
        return 0.0
    return nbytes / rate if rate > 0 else math.inf


def _server_time(problem: AllocationProblem, depths) -> float:
    return problem.server_block_time * float(np.sum(problem.num_blocks - np.asarray(depths, dtype=float)))


def _downlink_time(problem: AllocationProblem) -> float:
    return sum(dev.act_bytes for dev in problem.devices) / problem.downlink


# ----------------------------------------------------------------------------------------------- feasibility


def max_depths(problem: AllocationProblem) -> tuple[int, ...]:
    """Per device, the deepest cut its memory allows: largest d <= L - 1 with base + d * block_memory <= budget.

    Raises ValueError naming the first device that cannot hold even one block.
    """
    L, bm = problem.num_blocks, problem.block_memory
    out = []
    for u, dev in enumerate(problem.devices):
        room = dev.memory_budget - dev.base_memory
        if bm == 0:
            d = L - 1 if room >= 0 else 0
        else:
            d = min(L - 1, max(0, math.floor(room / bm)))
            # The division can round either way at an exact fit; settle it with the constraint as written.
            while d < L - 1 and dev.base_memory + (d + 1) * bm <= dev.memory_budget:
                d += 1
            while d > 0 and dev.base_memory + d * bm > dev.memory_budget:
                d -= 1
        if d < 1:
            raise ValueError(
                f"device {u}: memory_budget={dev.memory_budget:g} bytes cannot hold base_memory="
                f"{dev.base_memory:g} plus one block of block_memory={bm:g} bytes; it needs a budget of at "
                f"least {dev.base_memory + bm:g} bytes (or a smaller base_memory/block_memory), or leave it out"
            )
        out.append(d)
    return tuple(out)


def _check_error_budget(problem: AllocationProblem) -> None:
    if problem.error_budget < 0:
        raise ValueError(
            f"error_budget={problem.error_budget:g} cannot be met: the compression error "
            "sum_u err_weight_u * (1 - rho_u) is already 0 with rho_u = 1 on every device and never negative; "
            "use error_budget >= 0 (0 forbids compression)"
        )


# ----------------------------------------------------------------------------------------------- continuous part


@dataclass(frozen=True)
class _Links:
    """The depth-independent data of the continuous subproblem, as arrays."""

    t: np.ndarray  # block time per device
    a: np.ndarray  # uplink bytes at rho = 1
    w: np.ndarray  # error weights
    B: float
    E: float
    rho_min: float
    lo: np.ndarray = None  # per device, the least keep ratio (rho_min, or a curve's least measured ratio)
    pieces: tuple = ()  # per device (alpha, beta) arrays of a calibrated curve; empty: every device is linear

    @classmethod
    def of(cls, problem: AllocationProblem) -> _Links:
        devs = problem.devices
        rho_min = float(problem.rho_min)
        curved = any(d.err_curve for d in devs)
        pieces, lo = [], []
        for d in devs:
            if d.err_curve:
                vertices = convex_error_curve(d.err_curve)
                pieces.append(_pieces(vertices))
                lo.append(max(rho_min, vertices[0][0]))
            else:
                pieces.append((np.array([d.err_weight]), np.array([-d.err_weight])))
                lo.append(rho_min)
        return cls(
            t=np.array([d.block_time for d in devs]),
            a=np.array([d.act_bytes for d in devs]),
            w=np.array([d.err_weight if not d.err_curve else max(0.0, float(np.max(p[0] + p[1] * lo_u)))
                        for d, p, lo_u in zip(devs, pieces, lo)]),
            B=float(problem.uplink),
            E=float(problem.error_budget),
            rho_min=rho_min,
            lo=np.array(lo),
            pieces=tuple(pieces) if curved else (),
        )

    def error(self, rho: np.ndarray) -> np.ndarray:
        """Per-device error of keep ratios ``rho``."""
        if not self.pieces:
            return self.w * (1.0 - rho)
        return np.array([max(0.0, float(np.max(al + be * r))) for (al, be), r in zip(self.pieces, rho)])


def convex_error_curve(points) -> list[tuple[float, float]]:
    """The vertices, by increasing bytes ratio and ending at (1, 0), of the lower convex hull of ``points`` and
    (1, 0) where it decreases (a point with more bytes and more error than another is never worth sending)."""
    pts = sorted(set((float(r), float(e)) for r, e in points) | {(1.0, 0.0)})
    hull: list[tuple[float, float]] = []
    for p in pts:  # Andrew's monotone chain, lower half
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    first = 0
    while first < len(hull) - 1 and hull[first + 1][1] >= hull[first][1]:
        first += 1  # more bytes for no less error: never worth choosing
    return hull[first:]


def _pieces(vertices) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) of the segments of a convex decreasing curve: e(rho) = max_k alpha_k + beta_k rho."""
    if len(vertices) == 1:
        return np.array([0.0]), np.array([0.0])
    al, be = [], []
    for (r0, e0), (r1, e1) in zip(vertices, vertices[1:]):
        slope = (e1 - e0) / (r1 - r0)
        al.append(e0 - slope * r0)
        be.append(slope)
    return np.array(al), np.array(be)


def snap_to_settings(problem: AllocationProblem, allocation: Allocation) -> Allocation:
    """Each calibrated device's keep ratio rounded up to the next vertex of its curve (a setting it really has),
    the others unchanged, with the uplink split and the delay recomputed for them."""
    rho = list(allocation.keep_ratios)
    for u, dev in enumerate(problem.devices):
        if dev.err_curve:
            vertices = [r for r, _ in convex_error_curve(dev.err_curve)]
            rho[u] = next((r for r in vertices if r >= rho[u] - 1e-9), 1.0)
    links = _Links.of(problem)
    c = np.asarray(allocation.depths, dtype=float) * links.t
    _, b = _device_phase(c, np.array(rho), links)
    return Allocation(depths=allocation.depths, keep_ratios=tuple(rho), bandwidth=tuple(float(x) for x in b),
                      round_delay=round_delay(problem, allocation.depths, rho, b))


def _split_bandwidth(c: np.ndarray, k: np.ndarray, B: float) -> tuple[float, np.ndarray]:
    """Optimal uplink split for fixed compute times c and bytes k: (device-phase delay, bandwidth).

    With T the max of c_u + k_u / b_u, every device that sends finishes exactly at T at the optimum, so
    b_u = k_u / (T - c_u) and T solves sum_u k_u / (T - c_u) = B (left side strictly decreasing in T), unless
    a silent device's compute is already the bottleneck. Leftover bandwidth is handed out pro rata; it
    shortens nobody's critical path but costs nothing.
    """
    send = k > 0
    b = np.zeros_like(c)
    if not np.any(send):
        return float(np.max(c)), b
    cs, ks = c[send], k[send]
    need = lambda T: float(np.sum(ks / (T - cs))) - B  # noqa: E731
    lo = max(float(np.max(c)), float(np.max(cs + ks / B)))  # each device alone needs at least this long
    if need(lo) <= 0:
        T = lo
    else:
        hi = float(np.max(cs)) + float(np.sum(ks)) / B  # every gap >= sum k / B, so need(hi) <= 0
        step = 4 * np.finfo(float).eps * hi
        while need(hi) > 0:  # ... up to rounding, which is undone here
            hi, step = hi + step, 2 * step
        T = hi if need(hi) == 0 else brentq(need, lo, hi, xtol=1e-14 * hi, rtol=4 * np.finfo(float).eps)
    b[send] = ks / (T - cs)
    b *= B / float(np.sum(b))
    return T, b


def _device_phase(c: np.ndarray, rho: np.ndarray, links: _Links) -> tuple[float, np.ndarray]:
    """Exact device-phase delay (max of compute + uplink) of keep ratios rho under the optimal split."""
    T, b = _split_bandwidth(c, links.a * rho, links.B)
    per_device = [ci + _uplink_time(ki, bi) for ci, ki, bi in zip(c, links.a * rho, b)]
    return max(T, max(per_device)), b


def _repair(rho: np.ndarray, free: np.ndarray, links: _Links) -> np.ndarray:
    """Clip to the box and shrink the dropped fractions just enough to meet the error budget exactly."""
    rho = np.clip(rho, links.rho_min, 1.0)
    err = float(np.sum(links.w[free] * (1.0 - rho[free])))
    if err > links.E:
        # Scaling every drop by the same factor keeps rho within [rho_min, 1] and lands on the budget.
        rho[free] = 1.0 - (1.0 - rho[free]) * (links.E / err)
        while float(np.sum(links.w[free] * (1.0 - rho[free]))) > links.E:
            rho[free] = np.minimum(1.0, rho[free] + 4 * np.finfo(float).eps)
    return rho


def _solve_continuous(c: np.ndarray, links: _Links) -> tuple[float, np.ndarray, np.ndarray]:
    """Min over (rho, b) of the device phase for fixed compute times c: (delay, keep ratios, bandwidth)."""
    if links.pieces:
        return _solve_curves(c, links)
    n = len(c)
    send = links.a > 0
    # Devices that send nothing keep everything (compressing them would spend error budget for nothing);
    # devices whose error is free compress as far as allowed.
    rho = np.ones(n)
    rho[send & (links.w == 0)] = links.rho_min
    free = send & (links.w > 0)
    max_drop = float(np.sum(links.w[free])) * (1.0 - links.rho_min)
    if not np.any(free) or links.E <= 0 or max_drop <= links.E:
        if np.any(free) and links.E > 0:
            rho[free] = links.rho_min
        T, b = _device_phase(c, rho, links)
        return T, rho, b

    best_T, best_rho = math.inf, rho
    for start in _starting_points(c, rho, free, links):
        T, _ = _device_phase(c, start, links)
        if T < best_T:
            best_T, best_rho = T, start
    rho_slsqp = _slsqp(c, best_rho, best_T, free, send, links)
    if rho_slsqp is not None:
        rho_slsqp = _repair(rho_slsqp, free, links)
        T, _ = _device_phase(c, rho_slsqp, links)
        if T < best_T:
            best_T, best_rho = T, rho_slsqp
    T, b = _device_phase(c, best_rho, links)
    return T, best_rho, b


def _starting_points(c: np.ndarray, rho: np.ndarray, free: np.ndarray, links: _Links) -> list[np.ndarray]:
    """Feasible keep ratios to start from: the error budget spent uniformly, or greedily where a unit of
    error saves the most, measured in bytes, or in bandwidth needed to finish by the uniform start's delay.
    The last is the exact optimum if that delay were the answer: at a fixed delay the bandwidth a device
    needs is linear in its keep ratio, so the best spending is a fractional knapsack."""
    w, E = links.w, links.E
    uniform = rho.copy()
    uniform[free] = 1.0 - E / float(np.sum(w[free]))
    starts = [uniform]
    T0, _ = _device_phase(c, uniform, links)
    for gap in (np.ones_like(c), np.maximum(T0 - c, 1e-300)):
        greedy = rho.copy()
        budget = E
        ratio = np.where(free, links.a / gap / np.where(free, w, 1.0), -np.inf)
        for u in np.argsort(-ratio, kind="stable"):
            if not free[u] or budget <= 0:
                break
            drop = min(1.0 - links.rho_min, budget / w[u])
            greedy[u] = 1.0 - drop
            budget -= drop * w[u]
        starts.append(_repair(greedy, free, links))
    return starts


def _slsqp(c, rho0, T0, free, send, links: _Links) -> np.ndarray | None:
    """SLSQP on the epigraph form, scaled so every variable and constraint is O(1).

    Variables: rho_f for free devices, beta_s = b_s / B for sending devices, tau = T / T0, and with calibrated
    curves one s_f per free device (its error, over the budget's scale). Constraints: (tau - c_s/T0) * beta_s
    >= a_s rho_s / (B T0) (the uplink finishes by T, written without a division so beta may touch 0),
    sum beta <= 1, the error budget (linear in rho; with curves s_f >= alpha_k + beta_k rho_f for every piece k
    and sum s_f <= E), and tau >= c_u / T0 through tau's bound.
    """
    fi, si = np.flatnonzero(free), np.flatnonzero(send)
    nf, ns = len(fi), len(si)
    if T0 <= 0 or not math.isfinite(T0):
        return None
    cs = c[si] / T0
    kappa = links.a[si] / (links.B * T0)
    # Free devices all send, so each free variable maps to one sending row; the others' rho stay fixed.
    row_of_free = np.searchsorted(si, fi)
    rho_send0 = rho0[si]
    rows = np.arange(ns)
    curves = bool(links.pieces)
    tau = nf + ns  # index of tau; the s_f follow it with curves
    size = tau + 1 + (nf if curves else 0)

    def fin_cons(x):
        rho_s = rho_send0.copy()
        rho_s[row_of_free] = x[:nf]
        return (x[tau] - cs) * x[nf:tau] - kappa * rho_s

    def fin_jac(x):
        jac = np.zeros((ns, size))
        jac[row_of_free, np.arange(nf)] = -kappa[row_of_free]
        jac[rows, nf + rows] = x[tau] - cs
        jac[:, tau] = x[nf:tau]
        return jac

    lin_bw = np.zeros(size)
    lin_bw[nf:tau] = -1.0
    constraints = [
        {"type": "ineq", "fun": fin_cons, "jac": fin_jac},
        {"type": "ineq", "fun": lambda x: 1.0 + lin_bw @ x, "jac": lambda x: lin_bw[None, :]},
    ]
    if curves:
        err_scale = max(links.E, 1e-12)
        A, b = [], []  # s_f - (alpha + beta rho_f) / err_scale >= 0, every piece
        for j, u in enumerate(fi):
            for al, be in zip(*links.pieces[u]):
                row = np.zeros(size)
                row[j], row[tau + 1 + j] = -be / err_scale, 1.0
                A.append(row)
                b.append(-al / err_scale)
        A, b = np.array(A), np.array(b)
        lin_err = np.zeros(size)
        lin_err[tau + 1:] = -1.0
        err_off = links.E / err_scale
        constraints.append({"type": "ineq", "fun": lambda x: A @ x + b, "jac": lambda x: A})
    else:
        w_f = links.w[fi]
        err_scale = max(links.E, float(np.sum(w_f)))
        lin_err = np.concatenate([w_f / err_scale, np.zeros(ns), [0.0]])
        err_off = (links.E - float(np.sum(w_f))) / err_scale
    constraints.append({"type": "ineq", "fun": lambda x: err_off + lin_err @ x, "jac": lambda x: lin_err[None, :]})
    _, b0 = _device_phase(c, rho0, links)
    x0 = np.concatenate([rho0[fi], b0[si] / links.B, [1.0]]
                        + ([links.error(rho0)[fi] / err_scale] if curves else []))
    bounds = ([(float(links.lo[u]), 1.0) for u in fi] + [(0.0, 1.0)] * ns + [(float(np.max(c)) / T0, 1.0)]
              + [(0.0, None)] * (nf if curves else 0))
    objective = np.zeros(size)
    objective[tau] = 1.0
    res = minimize(
        lambda x: x[tau],
        x0,
        jac=lambda x: objective,
        method="SLSQP",
        bounds=bounds,
        constraints=constraints,
        options={"maxiter": 300 if curves else 200, "ftol": 1e-12},
    )
    if not np.all(np.isfinite(res.x)):
        return None
    rho = rho0.copy()
    rho[fi] = res.x[:nf]
    return rho


def _shrink(rho: np.ndarray, free: np.ndarray, links: _Links) -> np.ndarray:
    """Scale the drops (1 - rho) of free devices by the largest factor in [0, 1] that meets the error budget
    (the error is convex and increasing in that factor, so bisection finds it)."""
    def err(theta: float) -> float:
        r = rho.copy()
        r[free] = 1.0 - theta * (1.0 - rho[free])
        return float(np.sum(links.error(r)[free]))

    if err(1.0) <= links.E:
        return rho
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if err(mid) <= links.E else (lo, mid)
    out = rho.copy()
    out[free] = 1.0 - lo * (1.0 - rho[free])
    return out


def _solve_curves(c: np.ndarray, links: _Links) -> tuple[float, np.ndarray, np.ndarray]:
    """:func:`_solve_continuous` with calibrated error curves (Note: calibrated error): SLSQP on the epigraph
    form, started from the budget spent with every device's drop scaled alike."""
    n = len(c)
    send = links.a > 0
    at_least = links.error(links.lo)
    rho = np.ones(n)
    rho[send & (at_least <= 0)] = links.lo[send & (at_least <= 0)]  # compressing it costs nothing
    free = send & (at_least > 0)
    if not np.any(free) or links.E <= 0 or float(np.sum(at_least[free])) <= links.E:
        if np.any(free) and links.E > 0:
            rho[free] = links.lo[free]
        T, b = _device_phase(c, rho, links)
        return T, rho, b
    start = rho.copy()
    start[free] = links.lo[free]
    start = _shrink(start, free, links)
    best_T, _ = _device_phase(c, start, links)
    best_rho = start
    solved = _slsqp(c, start, best_T, free, send, links)
    if solved is not None:
        solved = _shrink(np.clip(solved, links.lo, 1.0), free, links)
        T, _ = _device_phase(c, solved, links)
        if T < best_T:
            best_T, best_rho = T, solved
    T, b = _device_phase(c, best_rho, links)
    return T, best_rho, b


# ----------------------------------------------------------------------------------------------- depths


def allocate(problem: AllocationProblem, *, max_enumeration: int = 4096) -> Allocation:
    """Depths, keep ratios and uplink split minimizing the round delay under memory, error and bandwidth.

    Depth search, over d_u in [1, max_depths(problem)[u]]:

    * at most ``max_enumeration`` depth vectors (the product of the per-device choices): branch and bound
      over all of them. Vectors are visited in increasing order of a lower bound on their delay (compute
      and uplink at the least bytes any feasible keep ratios allow), skipped when a solved, nowhere deeper
      vector already bounds their device phase too high (it only grows with compute time), and the search
      stops once the bound reaches the best delay found. Exact up to the continuous solver's accuracy;
      worst case one continuous solve per vector, typically a small fraction of them.
    * more: coordinate descent from the all-deepest and the all-shallowest vector, each device in turn set
      to its best depth with the others fixed; once a sweep changes nothing, steps of one block on two
      devices at once are tried, and the sweeps resume after any that helps. The result is a local optimum
      for those moves, with no global guarantee (a better vector may need three or more devices to move
      together). Cost per sweep: sum_u max_depths[u] + 2 U (U - 1) continuous solves.

    A continuous solve takes about a millisecond for a few devices and grows with U (SLSQP's dense QP).

    Raises ValueError when a device cannot hold one block or the error budget is negative.
    """
    _check_error_budget(problem)
    dmax = np.array(max_depths(problem))
    links = _Links.of(problem)
    offset = _downlink_time(problem)
    cache: dict[tuple[int, ...], tuple[float, np.ndarray, np.ndarray]] = {}

    def device_phase(depths: tuple[int, ...]) -> float:
        if depths not in cache:
            cache[depths] = _solve_continuous(np.asarray(depths, dtype=float) * links.t, links)
        return cache[depths][0]

    def total(depths: tuple[int, ...]) -> float:
        return device_phase(depths) + _server_time(problem, depths) + offset

    count = math.prod(int(d) for d in dmax)
    if count <= max_enumeration:
        best = _enumerate(problem, dmax, links, device_phase)
    else:
        best = _coordinate_descent(dmax, total)

    _, rho, b = cache[best]
    return Allocation(
        depths=best,
        keep_ratios=tuple(float(x) for x in rho),
        bandwidth=tuple(float(x) for x in b),
        round_delay=round_delay(problem, best, rho, b),
    )


def _min_total_bytes(links: _Links) -> float:
    """Least sum_u a_u rho_u any feasible keep ratios achieve (an LP, independent of depths)."""
    n = len(links.a)
    if not np.any(links.a > 0):
        return 0.0
    if links.pieces:  # variables rho (n) and s (n): min a.rho, s_u >= alpha + beta rho_u, sum s <= E
        A, b = [], []
        for u, (alpha, beta) in enumerate(links.pieces):
            for al, be in zip(alpha, beta):
                row = np.zeros(2 * n)
                row[u], row[n + u] = be, -1.0
                A.append(row)
                b.append(-al)
        A.append(np.concatenate([np.zeros(n), np.ones(n)]))
        b.append(links.E)
        res = linprog(np.concatenate([links.a, np.zeros(n)]), A_ub=np.array(A), b_ub=np.array(b),
                      bounds=[(float(x), 1.0) for x in links.lo] + [(0.0, None)] * n, method="highs")
        if res.status != 0:
            return float(np.sum(links.a * links.lo))
        return max(0.0, float(res.fun) * (1 - 1e-9))
    res = linprog(
        links.a,
        A_ub=-links.w[None, :],
        b_ub=[links.E - float(np.sum(links.w))],
        bounds=[(links.rho_min, 1.0)] * n,
        method="highs",
    )
    if res.status != 0:
        return float(np.sum(links.a)) * links.rho_min  # still a valid (weaker) bound
    return max(0.0, float(res.fun) * (1 - 1e-9))


def _enumerate(problem, dmax, links: _Links, device_phase) -> tuple[int, ...]:
    grid = np.array(list(itertools.product(*(range(1, int(d) + 1) for d in dmax))), dtype=np.int64)
    c = grid * links.t
    send = links.a > 0
    # Valid for every keep ratio: each device alone needs c_u + a_u rho_min / B; and since every gap
    # T - c_u is at most T - min_send c, the whole uplink needs T >= min_send c + (least total bytes) / B.
    alone = np.max(c + links.a * links.lo / links.B, axis=1)
    shared = (np.min(c[:, send], axis=1) if np.any(send) else np.zeros(len(c))) + _min_total_bytes(links) / links.B
    rest = problem.server_block_time * np.sum(problem.num_blocks - grid, axis=1) + _downlink_time(problem)
    bound = np.maximum(alone, shared) + rest
    # The device phase only grows with any device's compute time, so a solved vector bounds the device phase
    # of every vector that is at least as deep everywhere. The all-shallowest vector, solved first, bounds all.
    solved_depths = np.empty_like(grid)
    solved_phase = np.empty(len(grid))
    solved_depths[0], solved_phase[0], m = grid[0], device_phase(tuple(int(x) for x in grid[0])), 1
    best, best_T = tuple(int(x) for x in grid[0]), solved_phase[0] + rest[0]
    for i in np.argsort(bound, kind="stable"):
        if bound[i] >= best_T:
            break
        if i == 0:
            continue
        below = np.all(solved_depths[:m] <= grid[i], axis=1)
        if np.max(solved_phase[:m][below]) + rest[i] >= best_T:
            continue
        depths = tuple(int(x) for x in grid[i])
        solved_depths[m], solved_phase[m] = grid[i], device_phase(depths)
        if solved_phase[m] + rest[i] < best_T:
            best, best_T = depths, solved_phase[m] + rest[i]
        m += 1
    return best


def _coordinate_descent(dmax, total) -> tuple[int, ...]:
    n = len(dmax)

    def better(cands, current, current_T):
        for cand in cands:
            T = total(cand)
            # A relative margin keeps solver noise from cycling between near-equal vectors.
            if T < current_T * (1 - 1e-12):
                current, current_T = cand, T
        return current, current_T

    def pair_steps(current):
        for u, v in itertools.combinations(range(n), 2):
            for du, dv in itertools.product((-1, 1), repeat=2):
                cand = list(current)
                cand[u] += du
                cand[v] += dv
                if 1 <= cand[u] <= dmax[u] and 1 <= cand[v] <= dmax[v]:
                    yield tuple(cand)

    best, best_T = None, math.inf
    for start in (tuple(int(d) for d in dmax), tuple(1 for _ in dmax)):
        current, current_T = start, total(start)
        while True:
            before = current
            for u in range(n):
                line = (current[:u] + (d,) + current[u + 1 :] for d in range(1, int(dmax[u]) + 1))
                current, current_T = better(line, current, current_T)
            if current != before:
                continue
            # Pair steps catch the trap where one device should give up a block only if another does too.
            current, current_T = better(pair_steps(current), current, current_T)
            if current == before:
                break
        if current_T < best_T:
            best, best_T = current, current_T
    return best
