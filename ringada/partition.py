"""Blocks -> ranks, as pure functions. A partition is a list with the number of consecutive blocks per rank."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

# the splits rank 0 plans at start-up from costs it measures, and every rank then takes from it
PLANNED = ("capacity", "fastest")


def balanced_partition(num_blocks: int, extra_cost: list[float], min_blocks: list[int] | None = None) -> list[int]:
    """Split ``num_blocks`` equal blocks over ranks to minimize the largest load ``extra_cost[r] + blocks[r]``.

    ``extra_cost`` is each rank's fixed work in block units (the initiator's embedding + head + loss). Giving
    blocks one at a time to the least-loaded rank is optimal for unit-cost items; ties go to the lower rank.
    """
    world = len(extra_cost)
    minimum = list(min_blocks) if min_blocks is not None else [0] * world
    if sum(minimum) > num_blocks:
        raise ValueError(f"pipeline.partition: {world} ranks need at least {sum(minimum)} blocks, the model has "
                         f"{num_blocks}; use fewer ranks")
    blocks = list(minimum)
    heap = [(extra_cost[r] + blocks[r], r) for r in range(world)]
    heapq.heapify(heap)
    for _ in range(num_blocks - sum(minimum)):
        load, r = heapq.heappop(heap)
        blocks[r] += 1
        heapq.heappush(heap, (load + 1, r))
    return blocks


def even_partition(num_blocks: int, world_size: int, mode: str, head_cost: float) -> list[int]:
    """`even`: balance the work of a step that trains every block: a block's forward and backward (two block
    units) on the rank that holds it, the head's forward and backward (``head_cost`` block units, see
    :func:`head_cost_in_blocks`) on rank 0 in a ring, the last rank in a line. Every rank but the ring's
    initiator keeps at least one block."""
    extra = [0.0] * world_size
    extra[0 if mode == "ring" else world_size - 1] += head_cost / 2  # in blocks, each counting 2 units
    minimum = [0 if (r == 0 and mode == "ring") else 1 for r in range(world_size)]
    return balanced_partition(num_blocks, extra, minimum)


def capacity_partition(num_blocks: int, block_cost: list[float], extra_cost: list[float],
                       max_blocks: list[int], min_blocks: list[int]) -> list[int]:
    """`capacity`: blocks per rank minimizing the bottleneck stage time under memory limits.

    Rank r spends ``extra_cost[r] + b_r * block_cost[r]`` seconds per step (its speed folded into the costs) and
    can hold at most ``max_blocks[r]`` blocks (its memory budget). Blocks are identical, so only the counts
    matter; handing out blocks one at a time to the rank whose time grows least, among those with room, is
    optimal for this min-max of increasing per-rank costs.
    """
    world = len(block_cost)
    if any(lo > hi for lo, hi in zip(min_blocks, max_blocks)):
        r = next(r for r in range(world) if min_blocks[r] > max_blocks[r])
        raise ValueError(f"pipeline.partition: rank {r} must hold at least {min_blocks[r]} block(s) but its memory "
                         f"budget fits {max_blocks[r]}; give it more memory in the profile or use fewer ranks")
    if sum(max_blocks) < num_blocks:
        raise ValueError(f"pipeline.partition: no split fits: the ranks' memory budgets hold {sum(max_blocks)} of "
                         f"the model's {num_blocks} blocks ({max_blocks} per rank); add ranks or memory")
    blocks = list(min_blocks)
    if sum(blocks) > num_blocks:
        raise ValueError(f"pipeline.partition: {world} ranks need at least {sum(blocks)} blocks, the model has "
                         f"{num_blocks}; use fewer ranks")
    heap = [(extra_cost[r] + (blocks[r] + 1) * block_cost[r], r) for r in range(world) if blocks[r] < max_blocks[r]]
    heapq.heapify(heap)
    for _ in range(num_blocks - sum(blocks)):
        _, r = heapq.heappop(heap)
        blocks[r] += 1
        if blocks[r] < max_blocks[r]:
            heapq.heappush(heap, (extra_cost[r] + (blocks[r] + 1) * block_cost[r], r))
    return blocks


def search_partition(start: Sequence[int], predict: Callable[[list[int]], float], min_blocks: Sequence[int],
                     max_blocks: Sequence[int] | None = None) -> tuple[list[int], float]:
    """`fastest`'s search: from ``start``, re-split the blocks of one pair of ranks at a time (every split of the
    pair's blocks within ``min_blocks`` / ``max_blocks``, the other ranks' counts kept), taking the change that
    lowers ``predict`` most, until none does. Returns (partition, its prediction). With two ranks that is every
    split; with more, a split that no re-split of a pair improves (the best one where the time is a sum of
    convex per-rank terms). Ties keep the earlier split, so an equal one never replaces ``start``. Each split is
    predicted once."""
    known: dict[tuple[int, ...], float] = {}

    def predicted(split: list[int]) -> float:
        if tuple(split) not in known:
            known[tuple(split)] = predict(split)
        return known[tuple(split)]

    best = list(start)
    best_t = predicted(best)
    upper = list(max_blocks) if max_blocks is not None else [sum(best)] * len(best)
    while True:
        found = None
        for i, j in itertools.combinations(range(len(best)), 2):
            pair = best[i] + best[j]
            for left in range(max(min_blocks[i], pair - upper[j]), min(upper[i], pair - min_blocks[j]) + 1):
                if left == best[i]:
                    continue
                candidate = list(best)
                candidate[i], candidate[j] = left, pair - left
                t = predicted(candidate)
                if t < (found[1] if found else best_t) * (1 - 1e-9):
                    found = (candidate, t)
        if found is None:
            return best, best_t
        best, best_t = found


def plan_fastest(cfg, world_size: int) -> tuple[list[int], dict]:
    """`pipeline.partition: fastest` for a ring or line: the split whose training the simulator predicts shortest
    (sim.predicted_run_s: the run's own plans and unfreezing schedule, per-block costs measured on this machine),
    searched (:func:`search_partition`) from `even`'s split, a core per rank; with pipeline.profile from
    `capacity`'s, at each rank's speed and links and within its memory budget. Returns (partition, details)."""
    from .costs import block_costs
    from .models import num_blocks_of
    from .profiles import load_profile
    from .sim import predicted_run_s

    num_blocks, ring = num_blocks_of(cfg.model.path), cfg.pipeline.mode == "ring"
    minimum = [0 if (ring and r == 0) else 1 for r in range(world_size)]
    if cfg.pipeline.profile:
        start, details = plan_capacity(cfg, world_size)
        caps, profile = details["max_blocks"], load_profile(cfg.pipeline.profile)
    else:
        start = even_partition(num_blocks, world_size, cfg.pipeline.mode,
                               head_cost_in_blocks(cfg.model.path, cfg.model.task, cfg.model.num_labels))
        caps, profile = None, None
    costs = block_costs(cfg, -(-cfg.data.batch_size // cfg.data.micro_batches))
    predicted: dict[tuple[int, ...], float] = {}

    def predict(partition: list[int]) -> float:
        predicted[tuple(partition)] = t = predicted_run_s(cfg, partition, costs, profile)
        return t

    partition, seconds = search_partition(start, predict, minimum, caps)
    return partition, {"start": start, "start_s": predicted[tuple(start)], "predicted_s": seconds,
                       "max_blocks": caps, "searched": len(predicted)}


def stage_times(partition: list[int], block_cost: list[float], extra_cost: list[float]) -> list[float]:
    return [e + b * c for b, c, e in zip(partition, block_cost, extra_cost)]


def block_ranges(partition: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) of every rank."""
    ranges, lo = [], 0
    for count in partition:
        ranges.append((lo, lo + count))
        lo += count
    return ranges


def head_cost_in_blocks(path: str, task: str = "causal_lm", num_labels: int = 0) -> float:
    """The head's forward + backward work in block units (a block's forward is one unit), from parameter counts:
    a frozen linear layer's forward costs in proportion to its weights per token, and its backward (the input's
    gradient) as much again. SmolLM2's head comes to 16 (measured on CPU: about 17). A classifier sees one
    pooled vector per sequence (negligible); an LM head sees every token. The embedding lookup is negligible."""
    from .models import parameter_counts

    if task == "classification":
        return 0.0
    sizes = parameter_counts(path, task, num_labels)
    return 2 * sizes["head"] / max(sizes["block"], 1)


def plan_capacity(cfg, world_size: int) -> tuple[list[int], dict]:
    """`pipeline.partition: capacity` for a ring or line: per-rank costs from the measured per-block costs over
    each rank's speed (profile), memory caps from each rank's budget. Returns (partition, details).

    Memory: ringada/memory.py (weights, adapters and the activations of the micro-batches a rank may hold at
    once; the embedding on rank 0 and the head where it lives). The limits are estimates: see docs.
    """
    from .costs import block_costs
    from .memory import held_micro_batches, memory_model
    from .models import num_blocks_of
    from .profiles import load_profile

    profile = load_profile(cfg.pipeline.profile)
    if len(profile.devices) != world_size:
        raise ValueError(f"pipeline.profile: {cfg.pipeline.profile} describes {len(profile.devices)} ranks but "
                         f"WORLD_SIZE is {world_size}")
    rows = -(-cfg.data.batch_size // cfg.data.micro_batches)
    costs = block_costs(cfg, rows)
    ring = cfg.pipeline.mode == "ring"
    speeds = profile.device_speeds()
    model, held = memory_model(cfg, rows), held_micro_batches(cfg, world_size)
    block_mem = model.per_block(held)
    head_rank = 0 if ring else world_size - 1
    base = [model.weights(0, r == 0, r == head_rank) for r in range(world_size)]
    extra = [0.0] * world_size
    extra[0] += costs.embed_s / speeds[0]
    extra[head_rank] += (costs.head_fwd_s + costs.head_bwd_s) / speeds[head_rank]
    caps = [max(0, int((d.memory_mb * 2**20 - b) // block_mem)) for d, b in zip(profile.devices, base)]
    block_cost = [(costs.block_fwd_s + costs.block_bwd_s) / s for s in speeds]
    minimum = [0 if (ring and r == 0) else 1 for r in range(world_size)]
    partition = capacity_partition(num_blocks_of(cfg.model.path), block_cost, extra, caps, minimum)
    details = {"max_blocks": caps, "stage_s": stage_times(partition, block_cost, extra), "speeds": speeds,
               "block_cost_s": block_cost, "extra_cost_s": extra}
    return partition, details


def estimate_memory(cfg, partition: list[int]) -> list[float]:
    """Estimated bytes per rank for its slice (ringada/memory.py, the model `capacity` plans with; the
    Python/torch runtime itself excluded)."""
    from .memory import held_micro_batches, memory_model

    world = len(partition)
    model = memory_model(cfg, -(-cfg.data.batch_size // cfg.data.micro_batches))
    held = held_micro_batches(cfg, world)
    head_rank = 0 if cfg.pipeline.mode == "ring" else world - 1
    return [model.rank_bytes(b, r == 0, r == head_rank, held) for r, b in enumerate(partition)]


def check_memory(cfg, partition: list[int]) -> None:
    """With pipeline.profile: every rank's estimated slice must fit its memory budget."""
    from .profiles import load_profile

    profile = load_profile(cfg.pipeline.profile)
    if len(profile.devices) != len(partition):
        raise ValueError(f"pipeline.profile: {cfg.pipeline.profile} describes {len(profile.devices)} ranks but "
                         f"WORLD_SIZE is {len(partition)}")
    for r, (need, device) in enumerate(zip(estimate_memory(cfg, partition), profile.devices)):
        if need > device.memory_mb * 2**20:
            raise ValueError(f"pipeline.partition: rank {r} ({device.name}) would need ~{need / 2**20:.0f} MiB for "
                             f"{partition[r]} blocks but its budget is {device.memory_mb:.0f} MiB; give it fewer "
                             "blocks or use pipeline.partition=capacity")
