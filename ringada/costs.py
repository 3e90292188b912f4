"""Per-block compute costs, measured once on this machine for a batch shape and cached.

Measured with a one-block slice of the real model (embedding, block 0 with its adapters, head): forward and
backward of a block, forward of the head + loss as the runtime runs it (`train.head_loss`) and what its gradient
adds, and the embedding lookup. Partitioning, the time model and the simulator all read these numbers; the cache
lives under the ringada cache directory and is keyed by the model, task, adapter settings, batch shape and
thread count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .config import Config
from .models import _file_lock, cache_dir, load_model, parameter_counts, resolve_model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Costs:
    rows: int  # sequences per micro-batch
    seq_len: int
    block_fwd_s: float
    block_bwd_s: float  # backward of a trainable block (LoRA grads + input grad)
    head_fwd_s: float  # norm + head + loss
    head_bwd_s: float
    embed_s: float
    act_bytes: int  # one micro-batch's hidden state (fp32); memory is ringada/memory.py's

    def slowed(self, factor: float) -> Costs:
        """The compute costs ``factor`` times longer (see :func:`contention`); bytes unchanged."""
        return Costs(self.rows, self.seq_len, self.block_fwd_s * factor, self.block_bwd_s * factor,
                     self.head_fwd_s * factor, self.head_bwd_s * factor, self.embed_s * factor, self.act_bytes)

    def scaled(self, rows: int) -> Costs:
        """Costs for another micro-batch size (compute and bytes scale with rows)."""
        f = rows / self.rows
        return Costs(rows, self.seq_len, self.block_fwd_s * f, self.block_bwd_s * f, self.head_fwd_s * f,
                     self.head_bwd_s * f, self.embed_s * f, int(self.act_bytes * f))


def _key(cfg: Config, rows: int) -> str:
    text = json.dumps([str(resolve_model_dir(cfg.model.path)), cfg.model.task, cfg.model.num_labels,
                       cfg.adapter.kind, cfg.adapter.r, cfg.adapter.target_modules, rows, cfg.data.seq_len,
                       torch.get_num_threads(), "head_loss"])  # the last: how the head is timed
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def block_costs(cfg: Config, rows: int, repeats: int = 3) -> Costs:
    """Cached costs for micro-batches of ``rows`` sequences of data.seq_len tokens."""
    path = cache_dir() / "costs" / f"{_key(cfg, rows)}.json"
    # Ranks started together on one box take turns: the first measures, the others read its numbers, so all
    # of them derive the same partition from the same costs.
    with _file_lock(path.with_suffix(".lock")):
        if path.is_file():
            known = {f.name for f in fields(Costs)}  # files of earlier versions carry byte counts too
            return Costs(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})
        costs = measure(cfg, rows, repeats)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(costs)))
        tmp.replace(path)
    return costs


def measure(cfg: Config, rows: int, repeats: int = 3) -> Costs:
    from .adapters import add_adapters
    from .train import head_loss

    cut = load_model(cfg.model.path, cfg.model.task, cfg.model.num_labels, blocks=(0, 1), seed=cfg.run.seed)
    add_adapters(cut, cfg.adapter, cfg.run.seed)
    vocab = cut.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, cfg.data.seq_len), generator=gen)
    labels = ids if cfg.model.task == "causal_lm" else torch.zeros(rows, dtype=torch.long)
    samples = {k: [] for k in ("embed", "block_fwd", "block_bwd", "head_fwd", "head_bwd")}
    for _ in range(repeats + 1):  # the first round warms up allocators and kernels
        t0 = time.perf_counter()
        with torch.no_grad():
            hidden = cut.embed(ids)
            ctx = cut.context(hidden, None)
        t1 = time.perf_counter()
        out = cut.run_block(0, hidden, ctx)
        t2 = time.perf_counter()
        top = out.detach().requires_grad_(True)
        with torch.no_grad():  # the runtime's head and loss (a causal LM's in chunks, its gradient in forward)
            head_loss(cut, top, None, labels)
        t3 = time.perf_counter()
        loss = head_loss(cut, top, None, labels)[0] / labels.numel()
        loss.backward()
        t4 = time.perf_counter()
        out.backward(top.grad)
        t5 = time.perf_counter()
        # head: forward alone, and what the gradient adds to it
        for k, v in zip(("embed", "block_fwd", "block_bwd", "head_fwd", "head_bwd"),
                        (t1 - t0, t2 - t1, t5 - t4, t3 - t2, max(0.0, (t4 - t3) - (t3 - t2)))):
            samples[k].append(v)
    med = {k: statistics.median(v[1:]) for k, v in samples.items()}
    sizes = parameter_counts(cfg.model.path, cfg.model.task, cfg.model.num_labels)
    costs = Costs(rows=rows, seq_len=cfg.data.seq_len, block_fwd_s=med["block_fwd"], block_bwd_s=med["block_bwd"],
                  head_fwd_s=med["head_fwd"], head_bwd_s=med["head_bwd"], embed_s=med["embed"],
                  act_bytes=rows * cfg.data.seq_len * sizes["hidden"] * 4)
    log.info("measured costs for %d x %d: block fwd %.4fs bwd %.4fs, head fwd %.4fs bwd %.4fs", rows,
             cfg.data.seq_len, costs.block_fwd_s, costs.block_bwd_s, costs.head_fwd_s, costs.head_bwd_s)
    return costs


# ------------------------------------------------------------------------------------------- a loaded machine


def contention(cfg: Config, rows: int, procs: int, repeats: int = 40) -> float:
    """How much more CPU time a block's forward + backward takes while ``procs`` processes (a run's ranks, one
    thread each) compute at once on this box than alone: shared caches and memory bandwidth, and with more
    processes than cores the switches between them. CPU time, not wall time: the simulator shares the cores
    itself. Measured once and cached, like the block costs; the simulator multiplies the costs by it when a
    run's ranks keep every core of the box busy (more ranks than cores)."""
    path = cache_dir() / "costs" / f"contention-cpu-{_key(cfg, rows)}-{procs}.json"
    with _file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return float(json.loads(path.read_text())["factor"])
        alone = statistics.median(_timed_workers(cfg, rows, 1, repeats))
        loaded = statistics.median(_timed_workers(cfg, rows, procs, repeats))
        factor = max(1.0, loaded / alone)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"procs": procs, "alone_s": alone, "loaded_s": loaded, "factor": factor}))
        tmp.replace(path)
    log.info("contention with %d processes: a block takes %.2fx its CPU time alone", procs, factor)
    return factor


def _timed_workers(cfg: Config, rows: int, procs: int, repeats: int) -> list[float]:
    """Per worker, the median CPU seconds of a block's forward + backward, ``procs`` workers running at once."""
    import multiprocessing as mp
    import tempfile

    from .config import dump

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(dump(cfg))
        barrier, results = ctx.Barrier(procs), ctx.Queue()
        workers = [ctx.Process(target=_block_worker, args=(str(config), rows, repeats, barrier, results),
                               daemon=True) for _ in range(procs)]
        try:
            for w in workers:
                w.start()
            times = []
            for _ in workers:
                try:
                    times.append(results.get(timeout=600))
                except queue.Empty:
                    codes = [w.exitcode for w in workers]
                    raise RuntimeError(f"measuring contention: a worker gave no result in 600 s (exit codes "
                                       f"{codes})") from None
        finally:
            for w in workers:
                if w.is_alive():
                    w.terminate()
                w.join()
    return times


def _block_worker(config: str, rows: int, repeats: int, barrier, results) -> None:
    from .adapters import add_adapters
    from .config import load

    cfg = load(config)
    torch.set_num_threads(1)
    cut = load_model(cfg.model.path, cfg.model.task, cfg.model.num_labels, blocks=(0, 1), seed=cfg.run.seed)
    add_adapters(cut, cfg.adapter, cfg.run.seed)
    ids = torch.randint(0, cut.model.config.vocab_size, (rows, cfg.data.seq_len),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = cut.embed(ids)
        ctx = cut.context(hidden, None)

    def step() -> float:
        t0 = time.process_time()
        out = cut.run_block(0, hidden, ctx)
        out.sum().backward()
        return time.process_time() - t0

    step()  # warm up allocators and kernels
    barrier.wait(timeout=600)
    results.put(statistics.median(step() for _ in range(repeats)))
