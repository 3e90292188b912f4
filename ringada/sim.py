"""Discrete-event simulation of a run from the same plans the runtime executes, with profile costs.

Ring / line: every step's per-rank action lists (``schedule.build_schedule`` with that step's frontier) are run
by ``schedule.simulate_shared``. A compute action costs the measured per-block CPU seconds (``costs.py``); a rank
slower than this machine then sleeps the rest, as the emulation does (``runtime.emulated_slowdown``), and a
faster one computes faster (which no emulation can show). A message takes the link's latency plus its bytes over
the bandwidth. Star: one local step of every device as action lists (:func:`star_step_actions`) in the server's
order (`sfl`) or served as one batch (`sft`), through the same simulator, as star.emulate runs it (a device or
server faster than this machine counts as this machine).

Ranks started on one box share its cores: ``cores`` runs them under processor sharing (None: a core per rank), and
an emulated slow rank's sleep holds no core but is stretched with the compute it follows. ``msg_cost_per_byte``
charges each send and each receive that many CPU seconds per message byte (header included, the count the
summary's bytes use), for the copying a message costs on this machine.

The output has the fields of a real run's summary.json (mode, world_size, steps, tokens_per_s, wall_s and per-rank
fwd_s / bwd_s / wait_s / bytes), so a prediction can be set beside a measurement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from . import schedule as sched
from .comm import HEADER_BYTES
from .config import Config
from .costs import Costs
from .federated.scheduling import server_order
from .partition import head_cost_in_blocks
from .profiles import Profile
from .runtime import emulated_slowdown
from .train import trainable_count


@dataclass
class RankSpeeds:
    speeds: list[float]
    profile: Profile | None

    def link(self, nbytes: float) -> float:
        return self.profile.link_seconds(nbytes) if self.profile else 0.0


def _per_byte(msg_cost_per_byte: float, nbytes):
    """``msg_cost`` for the simulator: ``msg_cost_per_byte`` CPU seconds per byte of ``nbytes(action)``."""
    if not msg_cost_per_byte >= 0:
        raise ValueError(f"msg_cost_per_byte: got {msg_cost_per_byte!r}; expected seconds per byte >= 0")
    return (lambda a: msg_cost_per_byte * nbytes(a)) if msg_cost_per_byte else None


def simulate_pipeline(cfg: Config, partition: list[int], costs: Costs, profile: Profile | None = None,
                      steps: int | None = None, cores: int | None = None, msg_cost_per_byte: float = 0.0,
                      trainable: Sequence[int] | None = None, evaluations: bool = True) -> dict:
    """Predicted timings of a ring / line / single run (``steps`` defaults to run.steps; ``cores`` and
    ``msg_cost_per_byte``: see the module docstring). fwd_s / bwd_s are each rank's compute at its speed without
    contention, wait_s the rest of its steps (blocked in receives, or done before the step's end), cpu_s the CPU
    seconds it takes on this machine. pipeline.lookahead: after each step, rank 0 runs the next step's stage 0
    from its own finish, about a quarter of its blocks at a time, while the step lasts (at least one such chunk;
    the last one started may end past it), sharing the cores with the ranks still working, and that work is not
    done again in the next step. A plateau check (unfreeze.by plateau) evaluates inside its step:
    run.eval_batches forward-only batches of data.batch_size rows (with run.eval_batches 0, the whole eval set,
    whose size is not read here, no time);
    ``evaluations`` false leaves them out. ``trainable``: each step's trainable blocks as a run recorded them
    (metrics.jsonl), for a frontier that followed the losses the run saw; without it, the unfreezing schedule
    with no plateau."""
    world = len(partition)
    mode = "ring" if cfg.pipeline.mode == "ring" else "line"

    def lookahead_applies(step: int, plan: sched.Plan, next_plan: sched.Plan) -> bool:
        """As PipelineRuntime._lookahead and PipelineTrainer.next_step decide after ``step``."""
        nxt, u = step + 1, cfg.unfreeze
        return (cfg.pipeline.lookahead and world > 1 and nxt < steps and not plan.stages[0].has_head
                and not plan.backward[0] and not next_plan.backward[0]
                and not (u.by == "plateau" and u.every and nxt % u.every == 0))
    L, M, steps = sum(partition), cfg.data.micro_batches, steps or cfg.run.steps
    if trainable is not None and len(trainable) < steps:
        raise ValueError(f"trainable: got {len(trainable)} steps' trainable blocks for {steps} steps")
    speeds = profile.device_speeds() if profile else [1.0] * world
    # a slower rank computes at this machine's speed and sleeps the rest (the emulation); a faster one is faster
    slowdown = [emulated_slowdown(s) for s in speeds]
    net = RankSpeeds(speeds, profile)
    rows = [len(range(i, cfg.data.batch_size, M)) for i in range(M)]  # tensor_split sizes, in order
    mb_costs = [costs.scaled(r) for r in rows]
    head_trainable = cfg.model.task == "classification"
    head_cost = head_cost_in_blocks(cfg.model.path, cfg.model.task, cfg.model.num_labels)  # as the runtime's plans
    # a plateau check evaluates after its step, inside the step's time (PipelineTrainer.train_unit): run.eval_batches
    # batches of data.batch_size rows (the eval set is assumed to have that many; 0, the whole set, is left out)
    u = cfg.unfreeze
    eval_batches = cfg.run.eval_batches if cfg.data.eval and evaluations else 0
    fwd, bwd, idle, cpu = [0.0] * world, [0.0] * world, [0.0] * world, [0.0] * world
    sent, recv = [0] * world, [0] * world
    total, step_times, plans = 0.0, [], {}

    def message_bytes(a: sched.Action) -> int:
        return mb_costs[a.mb].act_bytes + HEADER_BYTES

    def link(a: sched.Action) -> float:
        return net.link(message_bytes(a))

    msg = _per_byte(msg_cost_per_byte, message_bytes)

    def frontier_at(step: int) -> int:  # where backward stops: the lowest trainable block, or 0 without early stop
        if not cfg.pipeline.early_stop:
            return 0
        if trainable:  # past the run's end (the lookahead's question), where it ended
            return L - trainable[min(step, len(trainable) - 1)]
        return L - trainable_count(cfg.unfreeze, L, step, 0, 0)

    def plan_at(step: int, evaluation: bool = False) -> sched.Plan:
        """The step's plan, or with ``evaluation`` the forward-only plan of an eval batch (as runtime.plan)."""
        key = (L, False) if evaluation else (frontier_at(step), head_trainable)
        if key not in plans:
            plans[key] = sched.build_schedule(mode, partition, M, *key, cfg.pipeline.schedule,
                                              head_cost=head_cost, speeds=speeds if profile else None)
        return plans[key]

    def checks_plateau(step: int) -> bool:
        return u.by == "plateau" and bool(u.every) and (step + 1) % u.every == 0 and eval_batches > 0

    def forward_here(a: sched.Action, plan: sched.Plan) -> float:
        st, c = plan.stages[a.stage], mb_costs[a.mb]
        t = (c.embed_s if st.has_embed else 0.0) + st.num_blocks * c.block_fwd_s
        return t + (c.head_fwd_s if st.has_head else 0.0)

    # pipeline.lookahead runs stage 0 ahead in chunks of about a quarter of its blocks (PipelineRuntime._lookahead)
    n0 = partition[0]
    chunk = max(1, -(-n0 // 4))
    per_mb = max(1, -(-n0 // chunk))

    def ahead_chunk(g: int) -> float:
        """The g-th chunk stage 0 runs ahead: micro-batch g // per_mb, the embedding with its first chunk."""
        m, k = divmod(g, per_mb)
        return (mb_costs[m].embed_s if k == 0 else 0.0) + (min(n0, (k + 1) * chunk) - k * chunk) * \
            mb_costs[m].block_fwd_s

    def stage0_left(m: int, done: int) -> float:
        """Stage 0's forward of micro-batch m once ``done`` chunks of the step ran ahead."""
        k = min(max(done - m * per_mb, 0), per_mb)
        return (0.0 if k else mb_costs[m].embed_s) + (n0 - min(n0, k * chunk)) * mb_costs[m].block_fwd_s

    ahead = 0  # chunks of this step's stage 0 that rank 0 ran during the previous step (pipeline.lookahead)
    for step in range(steps):
        frontier, plan = frontier_at(step), plan_at(step)

        def here(a: sched.Action) -> float:
            """The action's compute on this machine."""
            if a.kind == sched.F:
                return forward_here(a, plan)
            st, c = plan.stages[a.stage], mb_costs[a.mb]
            trained = max(0, st.hi - max(st.lo, frontier))
            return trained * c.block_bwd_s + (c.head_bwd_s if st.has_head else 0.0)

        def cost(a: sched.Action, ahead=ahead) -> float:
            if a.mb >= M:  # a chunk of the next step's stage 0, run ahead at the end of this one
                return ahead_chunk(a.mb - M) / max(speeds[0], 1.0)
            if a.kind == sched.F and a.stage == 0 and ahead:  # what rank 0 ran while waiting did not run again
                return stage0_left(a.mb, ahead) / max(speeds[0], 1.0)
            return here(a) / max(speeds[plan.stages[a.stage].rank], 1.0)

        result = sched.simulate_shared(plan.actions, cost, link, cores=cores, slowdown=slowdown, msg_cost=msg)
        # pipeline.lookahead: from its own finish, rank 0 runs the next step's frozen stage 0 a chunk at a time
        # (at least one: the sum has not come the moment it is posted) while the step lasts; the one it started
        # last may run past the step's end. Then the step again, with that work on rank 0's list.
        ahead = 0
        if lookahead_applies(step, plan, plan_at(step + 1)):
            t = result["finish"][0]
            while ahead < M * per_mb and (ahead == 0 or t < result["makespan"]):
                t += cost(sched.Action(sched.F, 0, M + ahead)) * (1.0 + slowdown[0])
                ahead += 1
            actions = [list(acts) for acts in plan.actions]
            actions[0] += [sched.Action(sched.F, 0, M + g) for g in range(ahead)]
            result = sched.simulate_shared(actions, cost, link, cores=cores, slowdown=slowdown, msg_cost=msg)
        step_s = result["makespan"]
        step_times.append(step_s)
        total += step_s
        for r, acts in enumerate(plan.actions):
            for a in acts:
                if a.kind == sched.F:
                    fwd[r] += here(a) / speeds[r]
                elif a.kind == sched.B:
                    bwd[r] += here(a) / speeds[r]
                elif a.kind in (sched.SEND_F, sched.SEND_B):
                    sent[r] += message_bytes(a)
                    recv[a.peer] += message_bytes(a)
            idle[r] += step_s - result["busy"][r]
            cpu[r] += result["cpu"][r]
        if checks_plateau(step):  # the evaluation is part of this step
            check = plan_at(step, evaluation=True)
            one = sched.simulate_shared(check.actions, lambda a: forward_here(a, check) / max(speeds[
                check.stages[a.stage].rank], 1.0), link, cores=cores, slowdown=slowdown, msg_cost=msg)
            eval_s = eval_batches * one["makespan"]
            step_times[-1] += eval_s
            total += eval_s
            for r, acts in enumerate(check.actions):
                fwd[r] += eval_batches * sum(forward_here(a, check) / speeds[r] for a in acts if a.kind == sched.F)
                idle[r] += eval_s - eval_batches * one["busy"][r]
                cpu[r] += eval_batches * one["cpu"][r]
    tokens = steps * cfg.data.batch_size * cfg.data.seq_len
    ranges = [(sum(partition[:r]), sum(partition[:r + 1])) for r in range(world)]
    return {
        "mode": cfg.pipeline.mode, "world_size": world, "steps": steps, "simulated": True,
        "partition": partition, "schedule": cfg.pipeline.schedule, "micro_batches": M, "cores": cores,
        "msg_cost_per_byte": msg_cost_per_byte,
        "tokens_per_s": tokens / total if total else math.inf, "wall_s": total, "step_s": total / steps,
        "step_s_each": step_times, "cpu_s_per_step": sum(cpu) / steps,
        "utilization": sum(cpu) / ((cores or world) * total) if total else 0.0,
        "ranks": [{"rank": r, "blocks": list(ranges[r]), "fwd_s": fwd[r], "bwd_s": bwd[r], "wait_s": idle[r],
                   "cpu_s": cpu[r], "bytes_sent": sent[r], "bytes_recv": recv[r]} for r in range(world)],
    }


def predicted_run_s(cfg: Config, partition: list[int], costs: Costs, profile: Profile | None = None) -> float:
    """A run's training time on ``partition`` as the simulator predicts it (a core per rank), for choosing a
    split: the steps grouped by trainable set (the unfreezing schedule; by epochs or plateau, whose frontier the
    run finds out, the initial set), each group of n steps simulated as its first step, n - 2 of its middle
    step (the lookahead both ways) and its last, or whole where n <= 3. Plateau checks' evaluations, about the
    same on any split, are left out."""
    L = sum(partition)
    path = [trainable_count(cfg.unfreeze, L, s, 0, 0) for s in range(cfg.run.steps)]
    total, s = 0.0, 0
    while s < len(path):
        n = next((k for k in range(s, len(path)) if path[k] != path[s]), len(path)) - s
        each = simulate_pipeline(cfg, partition, costs, profile, steps=min(n, 3), trainable=[path[s]] * min(n, 3),
                                 evaluations=False)["step_s_each"]
        total += sum(each) + (n - 3) * each[1] if n > 3 else sum(each)
        s += n
    return total


STAR_MODES = ("sfl", "sft")


def star_step_actions(mode: str, order: Sequence[int], U: int, steps: int = 1) -> list[list[sched.Action]]:
    """``steps`` local steps of ``U`` devices as per-rank action lists: rank 0 is the server, ranks 1..U the
    devices.

    Device u's own part is stage 2u and the server's part for it stage 2u + 1, so that sends and receives match
    by transfer (the micro-batch is the step: a device starts its next forward as soon as its backward is done,
    while the server still serves the others). As star.py runs them: a device forwards its blocks, sends the activation,
    waits for the gradient and runs its backward. The `sfl` server serves the devices one at a time in ``order``
    (receive, upper blocks + head + loss forward, backward, send the gradient); the `sft` server receives every
    activation first (in ``order``), then runs each device's forward and backward in turn and only then sends the
    gradients (``Server.serve`` with ``_device_by_device``)."""
    if mode not in STAR_MODES:
        raise ValueError(f"mode: got {mode!r}; expected one of {STAR_MODES}")
    if sorted(order) != list(range(1, U + 1)):
        raise ValueError(f"order: got {list(order)!r}; expected the device ranks 1..{U}, each once")
    A = sched.Action
    actions: list[list[sched.Action]] = [[] for _ in range(U + 1)]
    for k in range(steps):
        for u in range(1, U + 1):
            actions[u] += [A(sched.F, 2 * u, k), A(sched.SEND_F, 2 * u, k, 0), A(sched.RECV_B, 2 * u, k, 0),
                           A(sched.B, 2 * u, k)]
        receive = [A(sched.RECV_F, 2 * u + 1, k, u) for u in order]
        compute = [[A(sched.F, 2 * u + 1, k), A(sched.B, 2 * u + 1, k)] for u in order]
        send = [A(sched.SEND_B, 2 * u + 1, k, u) for u in order]
        if mode == "sfl":
            actions[0] += [a for r, c, s in zip(receive, compute, send) for a in (r, *c, s)]
        else:
            actions[0] += receive + [a for c in compute for a in c] + send
    return actions


def simulate_star_step(mode: str, depths: list[int], num_blocks: int, costs: Costs, profile: Profile,
                       policy: str = "heuristic", keep_ratio: float = 1.0, cores: int | None = None,
                       msg_cost_per_byte: float = 0.0, steps: int = 1, emulated: bool = True,
                       recompute: bool = False) -> dict:
    """Predicted time of a local step of every device in a star round (all devices active).

    ``makespan_s`` is the time of ``steps`` local steps over ``steps`` (a device's next forward overlaps the
    server's work for the others, as in a round of star.local_steps); ``server_s`` the same until the server's
    last gradient is sent, which is what a round's measured training time covers. ``emulated`` (the bench's
    runs, star.emulate): compute at this machine's speed, a device (or the server) slower than it sleeping the
    rest (a speed above 1 counts as 1), and every message held for latency + bytes / bandwidth of the uplink
    (to the server) or the downlink (back), with the whole link to itself. Otherwise (real devices, `ringada
    simulate`): compute at each profile speed and a link shared by the devices. ``recompute``: star.recompute's
    second forward of the server's blocks. ``cores`` and ``msg_cost_per_byte``: see the module docstring.

    `sfl` serves in ``server_order(policy, ...)`` of the release (device forward + uplink), server and tail
    (downlink + device backward) times each device would take on a core of its own; ``fifo_makespan_s`` is the
    step in FIFO order. The server sleeps after each compute action of its own (star.py: after all of a serve),
    which differs only when the server is slower than this machine and shares cores."""
    U, L = len(depths), num_blocks
    speeds = [profile.speed(d.gflops) for d in profile.devices[:U]] if len(profile.devices) >= U else [1.0] * U
    server_speed = profile.speed(profile.server_gflops)
    if emulated:
        slowdown = [emulated_slowdown(server_speed)] + [emulated_slowdown(s) for s in speeds]
        pace, share = [1.0] * (U + 1), 1
    else:  # real devices: compute at each one's own speed, faster than this machine too, and a shared uplink
        slowdown, pace, share = [0.0] * (U + 1), [server_speed, *speeds], U
    work = {}  # stage -> (forward, backward) CPU seconds on this machine (emulated) or on the device itself
    redo = 1.0 if recompute else 0.0  # star.recompute: the server runs its blocks' forward again in the backward
    for u, d in enumerate(depths, 1):
        work[2 * u] = ((costs.embed_s + d * costs.block_fwd_s) / pace[u], d * costs.block_bwd_s / pace[u])
        work[2 * u + 1] = (((L - d) * costs.block_fwd_s + costs.head_fwd_s) / pace[0],
                           ((L - d) * (costs.block_bwd_s + redo * costs.block_fwd_s) + costs.head_bwd_s) / pace[0])
    nbytes = costs.act_bytes * keep_ratio + HEADER_BYTES  # an activation up, its gradient (the same shape) down
    up = profile.link_seconds(nbytes, profile.uplink_mbps / share)
    down = profile.link_seconds(nbytes, profile.downlink_mbps / share)
    msg = _per_byte(msg_cost_per_byte, lambda a: nbytes)

    def cost(a: sched.Action) -> float:
        return work[a.stage][a.kind == sched.B]

    def link(a: sched.Action) -> float:
        return up if a.kind == sched.SEND_F else down

    def run(order: list[int]) -> dict:
        return sched.simulate_shared(star_step_actions(mode, order, U, steps), cost, link, cores=cores,
                                     slowdown=slowdown, msg_cost=msg)

    def out(order: list[int], result: dict) -> dict:
        # server_s: until the server's last gradient is sent, what a round's measured training time covers
        return {"makespan_s": result["makespan"] / steps, "server_s": result["finish"][0] / steps, "order": order,
                "cpu_s": sum(result["cpu"]) / steps, "utilization": result["utilization"]}

    if mode == "sft":
        order = list(range(1, U + 1))
        return out(order, run(order))

    def wall(t: float, rank: int) -> float:  # compute and its sleep on a core of its own
        return t + t * slowdown[rank]

    release = [wall(work[2 * u][0], u) + up for u in range(1, U + 1)]
    server = [wall(work[2 * u + 1][0], 0) + wall(work[2 * u + 1][1], 0) for u in range(1, U + 1)]
    tail = [down + wall(work[2 * u][1], u) for u in range(1, U + 1)]
    order = [u + 1 for u in server_order(policy, release, server, tail)]
    fifo = [u + 1 for u in server_order("fifo", release, server, tail)]
    result = run(order)
    return {**out(order, result), "fifo_makespan_s": (result if fifo == order else run(fifo))["makespan"] / steps}
