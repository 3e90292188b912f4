"""Each device's own training data: IID shards, or Dirichlet(alpha) over groups (labels for classification,
source works for causal LM), fixed by the seed."""

from __future__ import annotations

import numpy as np
import torch


def shard_rows(groups: torch.Tensor, num_devices: int, split: str, alpha: float, seed: int,
               min_rows: int) -> list[torch.Tensor]:
    """Row indices of every device's shard (disjoint, covering all rows)."""
    n = groups.numel()
    rng = np.random.default_rng(seed)
    if split == "iid":
        order = rng.permutation(n)
        shards = [order[u::num_devices] for u in range(num_devices)]
    else:
        parts: list[list[int]] = [[] for _ in range(num_devices)]
        values = groups.numpy()
        for g in np.unique(values):
            rows = rng.permutation(np.flatnonzero(values == g))
            share = rng.dirichlet([alpha] * num_devices)
            cuts = (np.cumsum(share)[:-1] * len(rows)).round().astype(int)
            for u, piece in enumerate(np.split(rows, cuts)):
                parts[u].extend(piece.tolist())
        shards = [rng.permutation(np.array(p, dtype=np.int64)) for p in parts]
    sizes = [len(s) for s in shards]
    if min(sizes) < min_rows:
        raise ValueError(f"star.split: device shards have {sizes} sequences but every device needs at least "
                         f"data.batch_size={min_rows}; raise star.alpha, use fewer devices or a smaller batch")
    return [torch.as_tensor(s, dtype=torch.long) for s in shards]
