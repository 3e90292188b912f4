"""The one memory model every planner uses: `even` / `capacity` partitions and their check
(ringada/partition.py), and the star allocation's device budgets (ringada/star.py).

Bytes a rank holds for its slice (the Python, torch and transformers runtime excluded, ~450 MiB on CPU):

    weights      blocks * block weights  +  embedding (if held)  +  head (if held)
                 a head tied to the embedding is one matrix: counted once when both sit on one rank, and in
                 full on a rank that holds the head without the embedding (a line's last rank keeps a copy)
    adapters     ADAPTER_SHARE of the fp32 block weights per block (LoRA or bottleneck weights, their gradients
                 and AdamW's two moments; r = 8 on SmolLM2 is well under it)
    activations  SAVED_PER_BLOCK tensors the size of one micro-batch's hidden state per block and per
                 micro-batch held at once (what autograd keeps for backward: inputs of norms, projections,
                 attention and MLP)

Weights and activations are in the base dtype (run.dtype). tests/test_memory.py checks the weights against
what ``load_model`` really allocates for each kind of slice.
"""

from __future__ import annotations

from dataclasses import dataclass

ADAPTER_SHARE = 0.03
SAVED_PER_BLOCK = 16


@dataclass(frozen=True)
class MemoryModel:
    block_weights: float  # bytes of one block's frozen weights
    embedding: float  # bytes of the embedding (token, and position for GPT-2)
    head: float  # bytes of the final norm and the output matrix (or classifier)
    tied: float  # bytes of the output matrix shared with the embedding (0 when untied)
    hidden_state: float  # bytes of one micro-batch's hidden state
    adapter: float  # adapter, gradient and optimizer bytes per block

    def weights(self, blocks: int, embed: bool, head: bool) -> float:
        total = blocks * (self.block_weights + self.adapter)
        total += (self.embedding if embed else 0.0) + (self.head if head else 0.0)
        return total - (self.tied if embed and head else 0.0)

    def per_block(self, held: int) -> float:
        """One more block on a rank holding ``held`` micro-batches' activations at once."""
        return self.block_weights + self.adapter + SAVED_PER_BLOCK * self.hidden_state * held

    def rank_bytes(self, blocks: int, embed: bool, head: bool, held: int) -> float:
        return self.weights(blocks, embed, head) + blocks * SAVED_PER_BLOCK * self.hidden_state * held


def memory_model(cfg, rows: int) -> MemoryModel:
    """The model of ``cfg``'s model and run.dtype, for micro-batches of ``rows`` rows of data.seq_len."""
    from .models import parameter_counts

    sizes = parameter_counts(cfg.model.path, cfg.model.task, cfg.model.num_labels)
    width = 2 if cfg.run.dtype == "bfloat16" else 4
    return MemoryModel(block_weights=sizes["block"] * width, embedding=sizes["embedding"] * width,
                       head=sizes["head"] * width,
                       tied=sizes["vocab"] * sizes["hidden"] * width if sizes["tied"] else 0.0,
                       hidden_state=rows * cfg.data.seq_len * sizes["hidden"] * width,
                       adapter=ADAPTER_SHARE * sizes["block"] * 4)


def held_micro_batches(cfg, world_size: int) -> int:
    """Micro-batches whose activations a pipeline rank may hold at once: all under gpipe, at most the pipeline
    depth (the ring's N + 1 stages) under 1f1b."""
    m = cfg.data.micro_batches
    return m if cfg.pipeline.schedule == "gpipe" else min(m, world_size + 1)
