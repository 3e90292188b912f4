"""What a codec costs in held-out loss, measured: calibration for ``star.allocate`` (Note: calibrated error in
ringada/federated/allocation.py).

For a cut after ``d`` blocks and a codec, the relative increase of the model's loss on held-out rows when the
hidden state at the cut travels through the codec: one forward pass keeps the hidden state at every cut, then
the blocks above each cut run again on the decoded state. The model is the frozen base (a run's adapters start
as the identity), the rows the first run.eval_batches batches of data.eval (data.train without one): one batch of
a few rows is noisy at the 1% level. The bytes ratio is what the codec really produced (blob bytes over float32
bytes).

Measurements are cached per model, data, batch and codec menu in ``$RINGADA_CACHE/calibration/`` (one process
measures; the other ranks on the box wait for its file), so that every rank plans with the same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import torch

from .compress import Codec, encode, decode
from .config import Config

log = logging.getLogger(__name__)

MENU_BITS = (3, 4, 5, 6, 8)  # the settings star.allocate chooses from: the configured bits and every wider one


def codec_menu(cfg: Config) -> list[int]:
    """Bits per activation value the allocation may give a device: compress.bits and the wider MENU_BITS."""
    bits = cfg.compress.bits
    return sorted({bits} | {b for b in MENU_BITS if b > bits})


def activation_codec(cfg: Config, bits: int) -> Codec:
    """The uplink codec of the compress section with ``bits`` per value."""
    from .compress import link_codecs

    return link_codecs(dataclasses.replace(cfg.compress, bits=bits)).activation


def cuts_to_measure(max_depth: int) -> list[int]:
    """Cuts 1, 2, 4, 8, ... up to ``max_depth`` and the deepest itself."""
    cuts, d = [], 1
    while d < max_depth:
        cuts.append(d)
        d *= 2
    return cuts + [max_depth]


def measure(cfg: Config, cuts: list[int], bits_menu: list[int]) -> dict:
    """{"cuts": [...], "bits": [...], "ratio": [[cut][bits]], "loss_increase": [[cut][bits]], "loss": base} on the
    first run.eval_batches eval batches, cached (see the module docstring)."""
    from .models import _file_lock, cache_dir, resolve_model_dir

    key = {"model": str(resolve_model_dir(cfg.model.path)), "data": cfg.data.eval or cfg.data.train,
           "seq_len": cfg.data.seq_len, "batch": cfg.data.batch_size, "cuts": cuts, "bits": bits_menu,
           "codecs": [dataclasses.asdict(activation_codec(cfg, b)) for b in bits_menu], "seed": cfg.run.seed,
           "dtype": cfg.run.dtype, "batches": cfg.run.eval_batches, "version": 2}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "calibration" / f"{digest}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        result = _measure(cfg, cuts, bits_menu)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**result, "key": key}))
        tmp.replace(path)
        log.info("calibrated %d codecs at cuts %s in %.1fs", len(bits_menu), cuts, time.perf_counter() - t0)
        return result


def _measure(cfg: Config, cuts: list[int], bits_menu: list[int]) -> dict:
    from .models import load_model, read_config
    from .runtime import base_dtype
    from .train import load_split, loss_sum

    split = "eval" if cfg.data.eval else "train"
    data = load_split(cfg, split, read_config(cfg.model.path).vocab_size)
    batches = list(data.eval_batches(cfg.data.batch_size, max(1, cfg.run.eval_batches)))
    cut = load_model(cfg.model.path, "causal_lm", seed=cfg.run.seed, dtype=base_dtype(cfg))
    codecs = [activation_codec(cfg, b) for b in bits_menu]
    gen = torch.Generator().manual_seed(cfg.run.seed)
    base, count = 0.0, 0
    coded = [[0.0] * len(codecs) for _ in cuts]
    blob_bytes = [[0] * len(codecs) for _ in cuts]
    raw_bytes = 0
    with torch.no_grad():
        for batch in batches:
            hidden = cut.embed(batch.input_ids)
            ctx = cut.context(hidden, batch.attention_mask)
            at = {}
            for i in range(cut.num_blocks):
                if i in cuts:
                    at[i] = hidden
                hidden = cut.run_block(i, hidden, ctx)
            if cut.num_blocks in cuts:
                at[cut.num_blocks] = hidden

            def loss_from(d: int, h: torch.Tensor) -> float:
                for i in range(d, cut.num_blocks):
                    h = cut.run_block(i, h, ctx)
                return float(loss_sum(cut.head(h, batch.attention_mask), batch.labels))

            base += float(loss_sum(cut.head(hidden, batch.attention_mask), batch.labels))
            count += int((batch.labels[:, 1:] != -100).sum())
            raw_bytes += hidden.numel() * 4
            for j, d in enumerate(cuts):
                for k, codec in enumerate(codecs):
                    blob = encode(at[d], codec, gen)
                    blob_bytes[j][k] += blob.numel()
                    coded[j][k] += loss_from(d, decode(blob).to(at[d].dtype))
    ratios = [[n / raw_bytes for n in row] for row in blob_bytes]
    increases = [[c / base - 1 for c in row] for row in coded]
    return {"cuts": cuts, "bits": bits_menu, "ratio": ratios, "loss_increase": increases, "loss": base / count}


def device_curve(calibration: dict, max_depth: int, budget: float) -> list[tuple[int, float, float]]:
    """(bits, bytes ratio, loss increase) of each menu setting for a device whose cut may be anywhere up to
    ``max_depth``: the worst over the measured cuts up to there (conservative: the allocation picks the depth
    after), keeping only settings within ``budget``. A measured decrease counts as 0."""
    rows = [i for i, d in enumerate(calibration["cuts"]) if d <= max_depth] or [0]
    out = []
    for k, bits in enumerate(calibration["bits"]):
        ratio = max(calibration["ratio"][i][k] for i in rows)
        increase = max(0.0, max(calibration["loss_increase"][i][k] for i in rows))
        if increase <= budget:
            out.append((bits, min(1.0, ratio), increase))
    return out
