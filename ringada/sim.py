"""Discrete-event simulation of a run from the same plans the runtime executes, with profile costs.

Ring / line: every step's per-rank action lists (``schedule.build_schedule`` with that step's frontier) are run
by ``schedule.simulate``: compute actions take the measured per-block costs (``costs.py``) divided by the rank's
speed from the profile; a message takes the link's latency plus its bytes over the bandwidth. Star: each device
step is release (device forward + uplink), server time, tail (downlink + device backward), ordered by the
server's scheduling policy (`sfl`) or served as one batch (`sft`).

The output has the fields of a real run's summary.json (mode, world_size, steps, tokens_per_s, wall_s and per-rank
fwd_s / bwd_s / wait_s / bytes), so a prediction can be set beside a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import schedule as sched
from .comm import HEADER_BYTES
from .config import Config
from .costs import Costs
from .federated.scheduling import makespan, server_order
from .profiles import Profile
from .train import trainable_count



@dataclass
class RankSpeeds:
    speeds: list[float]
    profile: Profile | None

    def link(self, nbytes: float) -> float:
        return self.profile.link_seconds(nbytes) if self.profile else 0.0


def shared_cores(makespan: float, compute_s: float, cores: int | None) -> float:
    """A step's time when its ranks share ``cores`` cores of one box (None: a core per rank): no shorter than the
    event timeline, nor than all of the step's compute spread over every core. ``compute_s`` is the compute at
    this machine's speed: an emulated slow device sleeps the rest, which takes no core."""
    return max(makespan, compute_s / cores) if cores else makespan


def simulate_pipeline(cfg: Config, partition: list[int], costs: Costs, profile: Profile | None = None,
                      steps: int | None = None, cores: int | None = None) -> dict:
    """Predicted timings of a ring / line / single run (``steps`` defaults to run.steps; ``cores``: see
    :func:`shared_cores`)."""
    world = len(partition)
    mode = "ring" if cfg.pipeline.mode == "ring" else "line"
    L, M, steps = sum(partition), cfg.data.micro_batches, steps or cfg.run.steps
    speeds = [profile.speed(d.gflops) for d in profile.devices] if profile else [1.0] * world
    net = RankSpeeds(speeds, profile)
    rows = [len(range(i, cfg.data.batch_size, M)) for i in range(M)]  # tensor_split sizes, in order
    mb_costs = [costs.scaled(r) for r in rows]
    head_trainable = cfg.model.task == "classification"
    fwd, bwd, idle = [0.0] * world, [0.0] * world, [0.0] * world
    sent, recv = [0] * world, [0] * world
    total, step_times, plans = 0.0, [], {}
    for step in range(steps):
        # where backward stops: the lowest trainable block, or block 0 without early stop
        frontier = L - trainable_count(cfg.unfreeze, L, step, 0, 0) if cfg.pipeline.early_stop else 0
        if frontier not in plans:
            plans[frontier] = sched.build_schedule(mode, partition, M, frontier, head_trainable,
                                                   cfg.pipeline.schedule)
        plan = plans[frontier]

        def cost(a: sched.Action) -> float:
            st, c = plan.stages[a.stage], mb_costs[a.mb]
            if a.kind == sched.F:
                t = (c.embed_s if st.has_embed else 0.0) + st.num_blocks * c.block_fwd_s
                t += c.head_fwd_s if st.has_head else 0.0
            else:
                trainable = max(0, st.hi - max(st.lo, frontier))
                t = trainable * c.block_bwd_s + (c.head_bwd_s if st.has_head else 0.0)
            return t / speeds[st.rank]

        def link(a: sched.Action) -> float:
            return net.link(mb_costs[a.mb].act_bytes + HEADER_BYTES)

        result = sched.simulate(plan, cost, link)
        step_s = shared_cores(result["makespan"], sum(b * v for b, v in zip(result["busy"], speeds)), cores)
        step_times.append(step_s)
        total += step_s
        for r, acts in enumerate(plan.actions):
            for a in acts:
                if a.kind == sched.F:
                    fwd[r] += cost(a)
                elif a.kind == sched.B:
                    bwd[r] += cost(a)
                elif a.kind in (sched.SEND_F, sched.SEND_B):
                    nbytes = mb_costs[a.mb].act_bytes + HEADER_BYTES
                    sent[r] += nbytes
                    recv[a.peer] += nbytes
            idle[r] += step_s - result["busy"][r]
    tokens = steps * cfg.data.batch_size * cfg.data.seq_len
    ranges = [(sum(partition[:r]), sum(partition[:r + 1])) for r in range(world)]
    return {
        "mode": cfg.pipeline.mode, "world_size": world, "steps": steps, "simulated": True,
        "partition": partition, "schedule": cfg.pipeline.schedule, "micro_batches": M, "cores": cores,
        "tokens_per_s": tokens / total if total else math.inf, "wall_s": total, "step_s": total / steps,
        "step_s_each": step_times,
        "ranks": [{"rank": r, "blocks": list(ranges[r]), "fwd_s": fwd[r], "bwd_s": bwd[r], "wait_s": idle[r],
                   "bytes_sent": sent[r], "bytes_recv": recv[r]} for r in range(world)],
    }


def simulate_star_step(mode: str, depths: list[int], num_blocks: int, costs: Costs, profile: Profile,
                       policy: str = "heuristic", keep_ratio: float = 1.0, cores: int | None = None) -> dict:
    """Predicted time of one local step of every device in a star round (all devices active; ``cores``: see
    :func:`shared_cores`)."""
    U = len(depths)
    speeds = [profile.speed(d.gflops) for d in profile.devices[:U]] if len(profile.devices) >= U else [1.0] * U
    server_speed = profile.speed(profile.server_gflops)
    up_share = profile.uplink_mbps / U  # the uplink is shared by the devices sending at once
    down_share = profile.downlink_mbps / U
    act = costs.act_bytes + HEADER_BYTES
    release, server, tail = [], [], []
    for d, s in zip(depths, speeds):
        release.append((costs.embed_s + d * costs.block_fwd_s) / s + profile.link_seconds(act * keep_ratio, up_share))
        server.append(((num_blocks - d) * (costs.block_fwd_s + costs.block_bwd_s) + costs.head_fwd_s
                       + costs.head_bwd_s) / server_speed)
        tail.append(profile.link_seconds(act * keep_ratio, down_share) + d * costs.block_bwd_s / s)
    compute = sum(server) * server_speed + sum(costs.embed_s + d * (costs.block_fwd_s + costs.block_bwd_s)
                                               for d in depths)  # at this machine's speed (see shared_cores)
    if mode == "sft":
        return {"makespan_s": shared_cores(max(release) + sum(server) + max(tail), compute, cores),
                "order": list(range(1, U + 1))}
    order = server_order(policy, release, server, tail)
    fifo = server_order("fifo", release, server, tail)
    return {"makespan_s": shared_cores(makespan(order, release, server, tail), compute, cores),
            "order": [u + 1 for u in order],
            "fifo_makespan_s": shared_cores(makespan(fifo, release, server, tail), compute, cores)}
