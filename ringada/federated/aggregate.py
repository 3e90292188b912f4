"""Layer-wise, example-weighted FedAvg over devices of different depths.

Each participating device contributes a *view*: the adapter tensors that trained on its data, wherever they lived
(device side for blocks below its cut, its server-side set above it; in `sft` the shared server set appears in
every device's view). For every tensor key, the new global value is the mean over the views holding that key,
weighted by each device's example count. LoRA A and B are averaged separately (as SplitLoRA does), so the global
product is not the mean of the products.
"""

from __future__ import annotations

import torch


def aggregate(views: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """``views``: (examples, {key: tensor}) per device -> {key: example-weighted mean over views with the key}."""
    if not views:
        raise ValueError("aggregate: no device views")
    totals: dict[str, float] = {}
    sums: dict[str, torch.Tensor] = {}
    for weight, state in views:
        if weight < 0:
            raise ValueError(f"aggregate: negative example count {weight}")
        for key, value in state.items():
            contribution = value.detach().double() * weight
            if key in sums:
                if sums[key].shape != contribution.shape:
                    raise ValueError(f"aggregate: {key} has shape {tuple(value.shape)} here and "
                                     f"{tuple(sums[key].shape)} elsewhere")
                sums[key] += contribution
                totals[key] += weight
            else:
                sums[key] = contribution
                totals[key] = weight
    out = {}
    for key, total in totals.items():
        if total <= 0:
            raise ValueError(f"aggregate: {key} has no examples behind it")
        dtype = next(state[key].dtype for _, state in views if key in state)
        out[key] = (sums[key] / total).to(dtype)
    return out
