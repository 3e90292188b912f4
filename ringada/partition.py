"""Blocks -> ranks, as pure functions. A partition is a list with the number of consecutive blocks per rank."""

from __future__ import annotations

import heapq


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
    """`even`: balance blocks, counting the head + loss as ``head_cost`` blocks on the rank that holds it
    (rank 0 in a ring, the last rank in a line). Every rank but the ring's initiator keeps at least one block."""
    extra = [0.0] * world_size
    extra[0 if mode == "ring" else world_size - 1] += head_cost
    minimum = [0 if (r == 0 and mode == "ring") else 1 for r in range(world_size)]
    return balanced_partition(num_blocks, extra, minimum)


def block_ranges(partition: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) of every rank."""
    ranges, lo = [], 0
    for count in partition:
        ranges.append((lo, lo + count))
        lo += count
    return ranges


def head_cost_in_blocks(config) -> float:
    """The head's forward + backward work in block units, from parameter counts of a meta-device model: a frozen
    linear layer costs in proportion to its weights per token. (The embedding lookup is negligible.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = AutoModelForSequenceClassification.from_config(config)
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    layers = next(m for name, m in model.named_modules() if name.endswith(("layers", ".h", "encoder.layer")))
    block_params = sum(p.numel() for p in layers[0].parameters())
    return head_params / max(block_params, 1)
