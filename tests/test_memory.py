"""The one memory model (ringada/memory.py) against what load_model really allocates, and its planners."""

from __future__ import annotations

import pytest

from ringada.config import load
from ringada.memory import ADAPTER_SHARE, SAVED_PER_BLOCK, held_micro_batches, memory_model
from ringada.models import load_model


def _held_bytes(cut) -> int:
    seen, total = set(), 0
    for p in cut.model.parameters():  # a tied matrix is one parameter, counted once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
@pytest.mark.parametrize("blocks, embed, head", [((0, 4), True, True), ((0, 1), True, False), ((1, 3), False, False),
                                                 ((3, 4), False, True), ((0, 0), True, True)])
def test_weights_are_what_a_slice_allocates(tiny_dirs, fam, blocks, embed, head):
    """Every slice a ring or line rank can hold: the whole model, the initiator of a line (embedding, no head),
    a middle rank, a line's last rank (the head without the embedding: a tied matrix is held in full there) and
    a ring initiator with no block."""
    cfg = load(None, [f"model.path={tiny_dirs[fam]}"])
    model = memory_model(cfg, rows=2)
    cut = load_model(str(tiny_dirs[fam]), "causal_lm", blocks=blocks, embed=embed, head=head)
    n = blocks[1] - blocks[0]
    assert model.weights(n, embed, head) - n * model.adapter == pytest.approx(_held_bytes(cut), rel=1e-12)


def test_tied_head_counts_where_it_lives_in_ring_and_line(tiny_dirs):
    from ringada.partition import estimate_memory

    ring = load(None, [f"model.path={tiny_dirs['llama']}", "pipeline.mode=ring", "data.micro_batches=2"])
    line = load(None, [f"model.path={tiny_dirs['llama']}", "pipeline.mode=line", "data.micro_batches=2"])
    model = memory_model(ring, rows=-(-ring.data.batch_size // 2))
    assert model.tied > 0  # the tiny llama ties its head to the embedding
    held = held_micro_batches(ring, 2)
    act = SAVED_PER_BLOCK * model.hidden_state * held
    # ring: rank 0 holds embedding and head, the tied matrix once; line: the last rank holds its own copy
    assert estimate_memory(ring, [2, 2]) == pytest.approx(
        [model.embedding + model.head - model.tied + 2 * (model.block_weights + model.adapter + act),
         2 * (model.block_weights + model.adapter + act)])
    assert estimate_memory(line, [2, 2])[1] - estimate_memory(ring, [2, 2])[1] == pytest.approx(model.head)
    assert model.adapter == pytest.approx(ADAPTER_SHARE * model.block_weights)


def test_bf16_halves_weights_and_activations(tiny_dirs):
    fp32 = memory_model(load(None, [f"model.path={tiny_dirs['llama']}"]), rows=2)
    bf16 = memory_model(load(None, [f"model.path={tiny_dirs['llama']}", "run.dtype=bfloat16"]), rows=2)
    assert bf16.block_weights * 2 == fp32.block_weights and bf16.hidden_state * 2 == fp32.hidden_state
    assert bf16.adapter == fp32.adapter  # adapters and their optimizer state stay fp32
