"""Which devices take part in a round, and which of them leave before finishing (mobility), as pure logic.

Mobility (MAVFL-style): a device passes through the server's coverage and stays for a dwell time drawn each
round. A device whose steps take longer than its dwell leaves mid-round (a dropout): it completes
floor(dwell / step_time) of its local steps, and its update is not aggregated.

`ucb` picks, each round, the devices with the highest upper-confidence score

    score_u = success_ratio_u + loss_weight * loss_u / max_loss - delay_weight * delay_u / max_delay
              + c * sqrt(2 ln(round + 1) / n_u)

where success_ratio_u is the fraction of its past selections that finished, loss_u its last training loss
(higher: more to learn from it), delay_u its last measured round time, n_u how often it was selected. Devices
never tried score +inf, so every device is tried once before exploitation starts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

SELECTIONS = ("all", "random", "ucb")
MOBILITY = ("none", "exponential", "uniform")


@dataclass
class Mobility:
    kind: str = "none"
    dwell_mean: float = 0.0  # seconds

    def dwell_times(self, rng: random.Random, devices: list[int]) -> dict[int, float]:
        """A dwell time per device for one round (inf: never leaves)."""
        if self.kind == "none":
            return {u: math.inf for u in devices}
        if self.kind == "exponential":
            return {u: rng.expovariate(1.0 / self.dwell_mean) for u in devices}
        return {u: rng.uniform(0.0, 2.0 * self.dwell_mean) for u in devices}


def steps_before_leaving(dwell: float, step_time: float, local_steps: int) -> int:
    """Local steps a device completes before its dwell time runs out."""
    if math.isinf(dwell) or step_time <= 0:
        return local_steps
    return min(local_steps, int(dwell // step_time))


@dataclass
class DeviceStats:
    selected: int = 0
    finished: int = 0
    loss: float | None = None
    delay: float | None = None


@dataclass
class Selector:
    """Chooses devices per round and learns from their outcomes (``record``)."""

    policy: str
    per_round: int  # 0: all devices
    seed: int = 0
    c: float = 1.0
    loss_weight: float = 0.5
    delay_weight: float = 0.5
    stats: dict[int, DeviceStats] = field(default_factory=dict)

    def select(self, round_index: int, devices: list[int]) -> list[int]:
        k = len(devices) if self.per_round == 0 else min(self.per_round, len(devices))
        if self.policy == "all" or k == len(devices):
            return sorted(devices)
        if self.policy == "random":
            return sorted(random.Random(self.seed * 7_919 + round_index).sample(sorted(devices), k))
        scores = {u: self.score(u, round_index) for u in devices}
        return sorted(sorted(devices, key=lambda u: (-scores[u], u))[:k])

    def score(self, device: int, round_index: int) -> float:
        s = self.stats.get(device)
        if s is None or s.selected == 0:
            return math.inf
        known = [v for v in self.stats.values() if v.selected]
        max_loss = max((v.loss for v in known if v.loss is not None), default=0.0) or 1.0
        max_delay = max((v.delay for v in known if v.delay is not None), default=0.0) or 1.0
        return (s.finished / s.selected
                + self.loss_weight * (s.loss or 0.0) / max_loss
                - self.delay_weight * (s.delay or 0.0) / max_delay
                + self.c * math.sqrt(2.0 * math.log(round_index + 1) / s.selected))

    def record(self, device: int, finished: bool, loss: float | None, delay: float | None) -> None:
        s = self.stats.setdefault(device, DeviceStats())
        s.selected += 1
        s.finished += int(finished)
        if loss is not None:
            s.loss = loss
        if delay is not None:
            s.delay = delay
