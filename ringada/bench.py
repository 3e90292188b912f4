"""`ringada bench`: systems side by side on the same model, data, split, adapters and steps.

Each system is a real run in fresh processes (torchrun for distributed ones), so its summary.json is measured the
same way as any run's. Systems run in rounds (every system once per round, the order rotating each round) to
spread machine noise; ratios are against `tdp-1f1b` measured in the same invocation. Writes DIR/bench.json,
DIR/bench.md and DIR/*.png.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

RING_SYSTEMS = ["ring-earlystop", "ring-full", "line", "tdp-gpipe", "tdp-1f1b", "single"]
STAR_SYSTEMS = ["sfl", "sft", "sft-compressed", "sfl-copy-per-device"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_settings(smoke: bool, data_dir: Path) -> dict:
    """The shared model, data, adapter and batch settings (smoke: a tiny random model CI can afford)."""
    if smoke:
        from .models import save_tiny

        model = data_dir / "tiny-llama"
        if not (model / "config.json").is_file():
            save_tiny(model, "llama", layers=8, hidden=64, vocab=256)
        tokens = data_dir / "tokens.jsonl"
        if not tokens.is_file():
            import random

            rng = random.Random(0)
            tokens.write_text("".join(json.dumps({"input_ids": [rng.randrange(1, 256) for _ in range(64)]}) + "\n"
                                      for _ in range(200)))
        return {"model.path": str(model), "data.train": str(tokens), "data.eval": str(tokens),
                "data.seq_len": 32, "data.batch_size": 8, "data.micro_batches": 4, "run.steps": 4,
                "run.eval_batches": 2, "adapter.r": 4}
    return {"model.path": "smollm2", "data.train": "shakespeare", "data.eval": "shakespeare", "data.seq_len": 128,
            "data.batch_size": 8, "data.micro_batches": 4, "run.steps": 4, "run.eval_batches": 2, "adapter.r": 8}


def system_settings(system: str, num_blocks: int, world: int) -> tuple[str, dict, int]:
    """(entry module, extra settings, processes) of one system."""
    top = max(1, round(num_blocks * 0.25))  # ring-earlystop trains the top 25% of blocks
    earlystop = {"unfreeze.initial": top, "unfreeze.every": 1_000_000}
    if system == "single":
        # one process may use every core of the machine, as the distributed systems do together
        return "ringada", {"pipeline.mode": "single", "run.threads": os.cpu_count() or 1, **earlystop}, 1
    if system == "ring-earlystop":
        return "ringada", {"pipeline.mode": "ring", **earlystop}, world
    if system == "ring-full":
        return "ringada", {"pipeline.mode": "ring"}, world
    if system == "line":
        return "ringada", {"pipeline.mode": "line", **earlystop}, world
    if system.startswith("tdp-"):
        return "ringada.baselines.tdp", {"pipeline.mode": "line", **earlystop}, world
    if system in STAR_SYSTEMS:
        # a server and `world` devices of increasing depth (about 1/15 .. 4/15 of the model each)
        depths = [max(1, round(num_blocks * (i + 1) / 15)) for i in range(world)]
        star = {"pipeline.mode": "sft" if system.startswith("sft") else "sfl", "star.device_blocks": depths,
                "star.rounds": 2, "data.micro_batches": 1}
        if system == "sft-compressed":
            star.update({"compress.topk": 0.1, "compress.bits": 4, "compress.lossless": "zlib"})
        if system == "sfl-copy-per-device":
            star["star.server_copies"] = True
        return "ringada", star, world + 1
    raise ValueError(f"unknown system {system!r}")


def run_system(system: str, settings: dict, out: Path, world: int, num_blocks: int, timeout: float) -> dict:
    module, extra, procs = system_settings(system, num_blocks, world)
    sets = {**settings, **extra, "run.out_dir": str(out), "pipeline.schedule": "1f1b"}
    if "star.rounds" in sets:
        sets["star.local_steps"] = max(1, sets["run.steps"] // sets["star.rounds"])
        sets["run.steps"] = sets["star.rounds"] * sets["star.local_steps"]
    if system == "tdp-gpipe":
        sets["pipeline.schedule"] = "gpipe"
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]
    if module == "ringada":
        args = ["train", *args]
    else:
        args = ["--schedule", system.split("-")[1], *args]
    if procs == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", module, *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ranks = summary["ranks"]
    bytes_sent = sum(r["bytes_sent"] for r in ranks)
    if system.startswith("tdp-"):
        # torch.distributed.pipelining keeps no byte counters: its activations and gradients cross each of the
        # N-1 edges once per micro-batch each way, with shapes known here
        from .models import parameter_counts

        hidden = parameter_counts(sets["model.path"])["hidden"]
        bytes_sent = (summary["steps"] * 2 * (procs - 1) * sets["data.batch_size"] * sets["data.seq_len"]
                      * hidden * 4)
    star = {}
    if "server" in summary:
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        chosen = [m["predicted_makespan_s"] for m in metrics if "predicted_makespan_s" in m]
        fifo = [m["fifo_makespan_s"] for m in metrics if "fifo_makespan_s" in m]
        star = {"server_held_bytes": summary["server"]["held_bytes"],
                "server_copy_per_device_bytes": summary["server"]["copy_per_device_bytes"],
                "makespan_vs_fifo": sum(chosen) / sum(fifo) if chosen and sum(fifo) else None}
    return {"system": system, **star, "tokens_per_s": summary["tokens_per_s"],
            "step_s": summary.get("train_s", summary["wall_s"]) / summary["steps"],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
            "bytes_sent": bytes_sent, "eval_loss": summary.get("eval_loss"),
            "final_loss": summary.get("final_loss"), "ranks": len(ranks), "process_s": time.perf_counter() - t0}


def run_bench(suite: str, out: Path, smoke: bool, repeats: int, world: int, timeout: float = 1800) -> dict:
    from .models import num_blocks_of

    out.mkdir(parents=True, exist_ok=True)
    settings = base_settings(smoke, out / "data")
    num_blocks = num_blocks_of(settings["model.path"])
    systems = {"ring": RING_SYSTEMS, "star": STAR_SYSTEMS, "all": RING_SYSTEMS + STAR_SYSTEMS}[suite]
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(repeats):
        order = systems[rep % len(systems):] + systems[:rep % len(systems)]  # rotate to spread drift
        for system in order:
            log.info("bench round %d/%d: %s", rep + 1, repeats, system)
            runs[system].append(run_system(system, settings, out / "runs" / f"{system}-{rep}", world, num_blocks,
                                           timeout))
    results = []
    for system, rs in runs.items():
        merged = dict(rs[0])
        for key in ("tokens_per_s", "step_s", "peak_rss_bytes", "bytes_sent"):
            merged[key] = statistics.median(r[key] for r in rs)
        if system in RING_SYSTEMS:
            merged["predicted_step_s"] = predicted_step(system, settings, world, num_blocks)
            merged["measured_over_predicted"] = merged["step_s"] / merged["predicted_step_s"]
        else:  # star steps depend on device profiles; `ringada simulate` predicts them from one
            merged["predicted_step_s"] = merged["measured_over_predicted"] = None
        results.append(merged)
    base = next((r for r in results if r["system"] == "tdp-1f1b"), None)
    for r in results:
        r["tokens_per_s_vs_tdp_1f1b"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    bench = {"suite": suite, "smoke": smoke, "repeats": repeats, "world_size": world, "settings": settings,
             "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "results": results}
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    (out / "bench.md").write_text(markdown_table(bench))
    plot(bench, out)
    return bench


def predicted_step(system: str, settings: dict, world: int, num_blocks: int) -> float:
    """The time model: the system's plan (its partition, schedule and trainable set) through the simulator with
    per-block costs measured once at one thread, assuming one core per rank. tdp backpropagates through every
    stage (no early stop), so its plan has the frontier at block 0."""
    import torch

    from . import config as config_mod
    from .costs import block_costs
    from .runtime import make_topology
    from .sim import simulate_pipeline

    _, extra, procs = system_settings(system, num_blocks, world)
    sets = {**settings, **extra, "pipeline.schedule": "gpipe" if system == "tdp-gpipe" else "1f1b"}
    if system.startswith("tdp-"):
        sets.update({"unfreeze.initial": num_blocks, "unfreeze.every": 1_000_000})
    cfg = config_mod.load(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = -(-cfg.data.batch_size // cfg.data.micro_batches)
        costs = block_costs(cfg, rows)
    finally:
        torch.set_num_threads(threads)
    partition = make_topology(cfg, 0, procs).partition
    return simulate_pipeline(cfg, partition, costs)["step_s"]


def markdown_table(bench: dict) -> str:
    lines = ["| system | tokens/s | × tdp-1f1b | step s | predicted step s | measured / predicted | "
             "peak RSS MiB (max rank) | bytes sent MB | eval loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        ratio = f"{r['tokens_per_s_vs_tdp_1f1b']:.2f}" if r["tokens_per_s_vs_tdp_1f1b"] else "-"
        ev = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        pred = f"{r['predicted_step_s']:.2f}" if r.get("predicted_step_s") else "-"
        over = f"{r['measured_over_predicted']:.2f}" if r.get("measured_over_predicted") else "-"
        lines.append(f"| {r['system']} | {r['tokens_per_s']:.1f} | {ratio} | {r['step_s']:.2f} | {pred} | {over} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['bytes_sent'] / 1e6:.1f} | {ev} |")
    star = [r for r in bench["results"] if "server_held_bytes" in r]
    if star:
        lines += ["", "| system | server holds MiB | one copy per device would hold MiB | makespan / FIFO |",
                  "|---|---|---|---|"]
        for r in star:
            ms = f"{r['makespan_vs_fifo']:.3f}" if r["makespan_vs_fifo"] else "-"
            lines.append(f"| {r['system']} | {r['server_held_bytes'] / 2**20:.1f} | "
                         f"{r['server_copy_per_device_bytes'] / 2**20:.1f} | {ms} |")
    return "\n".join(lines) + "\n"


def plot(bench: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["system"] for r in bench["results"]]
    for key, label, scale in (("tokens_per_s", "tokens/s", 1), ("peak_rss_bytes", "peak RSS (MiB, max rank)", 2**20),
                              ("bytes_sent", "bytes sent (MB)", 1e6)):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(names, [r[key] / scale for r in bench["results"]], color="#4c72b0")
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / f"{key}.png", dpi=110)
        plt.close(fig)
