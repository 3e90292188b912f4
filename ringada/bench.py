"""`ringada bench`: systems side by side on the same model, data, split, adapters and steps.

Each system is a real run in fresh processes (torchrun for distributed ones), so its summary.json is measured the
same way as any run's. Systems run in rounds (every system once per round, the order rotating each round) to
spread machine noise; ratios are against `tdp-1f1b` measured in the same invocation. Writes DIR/bench.json,
DIR/bench.md and DIR/*.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

RING_SYSTEMS = ["ring-earlystop", "ring-noearlystop", "ring-nolookahead", "ring-full", "line", "line-nolookahead",
                "tdp-gpipe", "tdp-1f1b", "tdp-1f1b-full", "single"]
STAR_SYSTEMS = ["sfl", "sft", "sft-compressed", "sfl-copy-per-device", "sfl-fifo"]
EMULATED_SYSTEMS = ["ring-earlystop", "ring-full", "line"]  # what `--profile` runs (ringada's own pipeline)
# the star suite with `--profile`: the server's order against FIFO, and sft, on emulated devices and links
EMULATED_STAR_SYSTEMS = ["sfl", "sfl-fifo", "sft"]
# The compression sweep: sft (the star suite's devices) with each codec setting of the compress section.
COMPRESS_SETTINGS = {
    "uncompressed": {},
    "int8": {"compress.bits": 8, "compress.scale": "group", "compress.rounding": "nearest",
             "compress.lossless": "zlib"},
    "int4": {"compress.bits": 4, "compress.scale": "group", "compress.rounding": "nearest",
             "compress.lossless": "zlib"},
    # per-token ranges after a 64-channel Hadamard rotation, entropy-coded (lzma)
    "int4-hadamard": {"compress.bits": 4, "compress.scale": "token", "compress.hadamard": 64,
                      "compress.rounding": "nearest", "compress.lossless": "lzma"},
    "int4-hadamard-grad3": {"compress.bits": 4, "compress.grad_bits": 3, "compress.scale": "token",
                            "compress.hadamard": 64, "compress.rounding": "nearest", "compress.error_feedback": True,
                            "compress.lossless": "lzma"},
    "int3-hadamard": {"compress.bits": 3, "compress.scale": "token", "compress.hadamard": 64,
                      "compress.rounding": "nearest", "compress.error_feedback": True, "compress.lossless": "lzma"},
    # the original SFT recipe: the largest 10% of the whole tensor, one [min, max] range, zlib
    "topk": {"compress.topk": 0.1, "compress.bits": 4, "compress.scale": "tensor", "compress.lossless": "zlib"},
}
COMPRESS_SYSTEMS = [f"sft-{name}" for name in COMPRESS_SETTINGS]
# Time to target: every system trains all it can reach, on the same model, data, batch and token budget.
TTA_SYSTEMS = ["ring-plateau", "ring-steps", "ring-full", "line-full", "tdp-1f1b-full", "sfl", "sft", "single-full"]
# the tta suite with `--profile`: what ringada can emulate (ring systems on a ring profile such as ring4.yaml, star
# systems on a star profile such as edge4.yaml; --systems picks those that fit the profile)
EMULATED_TTA_SYSTEMS = ["ring-plateau", "ring-steps", "ring-full", "line-full", "sfl", "sft"]
SMASHED_KINDS = ("activation", "gradient", "top_hidden", "top_gradient")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_settings(smoke: bool, data_dir: Path, steps: int = 4) -> dict:
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
                "data.seq_len": 32, "data.batch_size": 8, "data.micro_batches": 4, "run.steps": steps,
                "run.eval_batches": 2, "adapter.r": 4}
    return {"model.path": "smollm2", "data.train": "shakespeare", "data.eval": "shakespeare", "data.seq_len": 128,
            "data.batch_size": 8, "data.micro_batches": 4, "run.steps": steps, "run.eval_batches": 2,
            "adapter.r": 8}


def is_star(system: str) -> bool:
    return system in STAR_SYSTEMS or system in COMPRESS_SYSTEMS


def trains_all(system: str) -> bool:
    """Whether the system trains every block (else the top 25%, as ring-earlystop)."""
    return system in ("ring-full", "tdp-1f1b-full", "line-full", "single-full") or is_star(system)


def reference_of(system: str) -> str | None:
    """The tdp 1F1B run with the same trainable set, which the system's tokens/s is set against."""
    if is_star(system):
        return None
    return "tdp-1f1b-full" if trains_all(system) else "tdp-1f1b"


def system_settings(system: str, num_blocks: int, world: int) -> tuple[str, dict, int]:
    """(entry module, extra settings, processes) of one system."""
    top = max(1, round(num_blocks * 0.25))  # ring-earlystop trains the top 25% of blocks
    earlystop = {"unfreeze.initial": top, "unfreeze.every": 1_000_000}
    if system == "single":
        # one process may use every core of the machine, as the distributed systems do together
        return "ringada", {"pipeline.mode": "single", "run.threads": os.cpu_count() or 1, **earlystop}, 1
    if system == "ring-earlystop":
        return "ringada", {"pipeline.mode": "ring", **earlystop}, world
    if system == "ring-noearlystop":  # the ablation: same trainable set, backward through every block
        return "ringada", {"pipeline.mode": "ring", "pipeline.early_stop": False, **earlystop}, world
    if system in ("ring-nolookahead", "line-nolookahead"):  # ablations: no next-step stage 0 while waiting
        return "ringada", {"pipeline.mode": system.split("-")[0], "pipeline.lookahead": False, **earlystop}, world
    if system == "ring-full":
        return "ringada", {"pipeline.mode": "ring"}, world
    if system == "ring-plateau":  # top 25% first, 25% more whenever the held-out loss stalls (checked every 2 steps)
        return "ringada", {"pipeline.mode": "ring", "unfreeze.initial": top, "unfreeze.increment": top,
                           "unfreeze.by": "plateau", "unfreeze.every": 2, "unfreeze.patience": 1,
                           "unfreeze.min_delta": 0.01}, world
    if system == "ring-steps":  # top 25% first, 25% more every 2 steps: everything trains from step 6
        return "ringada", {"pipeline.mode": "ring", "unfreeze.initial": top, "unfreeze.increment": top,
                           "unfreeze.every": 2}, world
    if system == "line-full":
        return "ringada", {"pipeline.mode": "line"}, world
    if system == "single-full":
        return "ringada", {"pipeline.mode": "single", "run.threads": os.cpu_count() or 1}, 1
    if system == "line":
        return "ringada", {"pipeline.mode": "line", **earlystop}, world
    if system == "tdp-1f1b-full":
        return "ringada.baselines.tdp", {"pipeline.mode": "line"}, world
    if system.startswith("tdp-"):
        return "ringada.baselines.tdp", {"pipeline.mode": "line", **earlystop}, world
    if is_star(system):
        # a server and `world` devices of increasing depth (about 1/15 .. 4/15 of the model each)
        depths = [max(1, round(num_blocks * (i + 1) / 15)) for i in range(world)]
        star = {"pipeline.mode": "sft" if system.startswith("sft") else "sfl", "star.device_blocks": depths,
                "star.rounds": 2, "data.micro_batches": 1}
        if system == "sft-compressed":  # what configs/sft_smollm2_compressed.yaml ships
            star.update(COMPRESS_SETTINGS["int4-hadamard-grad3"])
        if system == "sfl-copy-per-device":
            star["star.server_copies"] = True
        if system == "sfl-fifo":  # the baseline of the server's order: serve devices as their activations come
            star["star.schedule"] = "fifo"
        if system in COMPRESS_SYSTEMS:
            star.update(COMPRESS_SETTINGS[system.removeprefix("sft-")])
        return "ringada", star, world + 1
    raise ValueError(f"unknown system {system!r}")


def resolved_settings(system: str, settings: dict, num_blocks: int, world: int,
                      profile: str | None = None) -> tuple[str, dict, int]:
    """(entry module, every --set of the run, processes) of one system; with a ``profile`` the run emulates its
    devices and links on this machine and partitions by capacity."""
    module, extra, procs = system_settings(system, num_blocks, world)
    for key in ("star.device_blocks", "star.rounds"):  # --set chooses the devices' depths and the rounds
        if key in settings:
            extra.pop(key, None)
    sets = {**settings, **extra, "pipeline.schedule": "gpipe" if system == "tdp-gpipe" else "1f1b"}
    if profile:
        if system not in EMULATED_SYSTEMS + EMULATED_STAR_SYSTEMS + EMULATED_TTA_SYSTEMS:
            raise ValueError(f"--profile: {system} cannot be emulated; with a profile the systems are "
                             f"{', '.join(EMULATED_SYSTEMS)} (ring suite), {', '.join(EMULATED_STAR_SYSTEMS)} "
                             f"(star suite) or {', '.join(EMULATED_TTA_SYSTEMS)} (tta suite)")
        if is_star(system):
            sets.update({"star.profile": profile, "star.emulate": True})
        else:
            sets.update({"pipeline.profile": profile, "pipeline.emulate": True, "pipeline.partition": "capacity"})
    if "star.rounds" in sets:
        sets["star.local_steps"] = max(1, sets["run.steps"] // sets["star.rounds"])
        sets["run.steps"] = sets["star.rounds"] * sets["star.local_steps"]
    return module, sets, procs


def _set_args(sets: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()]


def run_system(system: str, settings: dict, out: Path, world: int, num_blocks: int, timeout: float,
               profile: str | None = None) -> dict:
    module, sets, procs = resolved_settings(system, settings, num_blocks, world, profile)
    sets["run.out_dir"] = str(out)
    if module == "ringada":
        sets["run.resume"] = False  # a fresh run, even where an earlier bench left checkpoints
    args = [x for kv in _set_args(sets) for x in ("--set", kv)]
    if module == "ringada":
        args = ["train", *args]
    else:
        args = ["--schedule", "gpipe" if system == "tdp-gpipe" else "1f1b", *args]
    if procs == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", module, *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    # a setting refused before training (e.g. no split fits the profile's memory): exit code 2 (under torchrun,
    # its ranks' exit code), and rank 0's error names the setting
    if result.returncode == 2 or re.search(r"exitcode\s*:\s*2\b", result.stderr):
        errors = [line.split("error:", 1)[1].strip() for line in result.stderr.splitlines()
                  if line.startswith("ringada:") and "error:" in line]
        raise Refused("not run: " + next((e for e in errors if "refused to start" not in e),
                                         errors[0] if errors else result.stderr.strip()[-500:]))
    if result.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ranks = summary["ranks"]
    # training traffic where the runtime counts it apart (ring / line), else everything the ranks sent
    train_bytes = [r.get("train_bytes_sent") for r in ranks]
    bytes_sent = sum(train_bytes) if None not in train_bytes else sum(r["bytes_sent"] for r in ranks)
    if system.startswith("tdp-"):
        # torch.distributed.pipelining keeps no byte counters: activations cross each of the N-1 edges once per
        # row, and a gradient goes back over an edge only when the stage above it takes an input that requires
        # grad (something below the edge is trainable); shapes are known here
        from .models import parameter_counts

        hidden = parameter_counts(sets["model.path"])["hidden"]
        frontier = num_blocks - sets.get("unfreeze.initial", num_blocks)
        grad_edges = sum(1 for r in ranks[1:] if r["blocks"][0] > frontier)
        bytes_sent = (summary["steps"] * (procs - 1 + grad_edges) * sets["data.batch_size"] * sets["data.seq_len"]
                      * hidden * 4)
    extra: dict = {}  # what only some systems have (star server, compression, curve)
    if "server" in summary:
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        chosen = [m["predicted_makespan_s"] for m in metrics if "predicted_makespan_s" in m]
        fifo = [m["fifo_makespan_s"] for m in metrics if "fifo_makespan_s" in m]
        # the server's step times as it measured them, the first step left out (its order had no timings yet)
        served = [m["step_s"] for m in metrics if "step_s" in m and m.get("step", 0) > 0]
        rounds = [m["round_s"] for m in metrics if "round_s" in m]
        # a round until every device's last backward is done (its adapters received), per local step; the
        # first round left out like the first step
        trained = [m["round_trained_s"] / (summary["steps"] // len(rounds)) for m in metrics
                   if "round_trained_s" in m and m.get("round", 0) > 0]
        extra = {"server_held_bytes": summary["server"]["held_bytes"],
                "server_copy_per_device_bytes": summary["server"]["copy_per_device_bytes"],
                "server_peak_rss_bytes": ranks[0]["peak_rss_bytes"],
                "server_rss_before_model_bytes": summary["server"].get("rss_before_model_bytes"),
                "server_step_s": statistics.median(served) if served else None,
                # the rounds' training time per step, round-end exchange and checkpoints left out: what the
                # simulator predicts for a round of local steps
                "round_step_s": sum(rounds) / summary["steps"] if rounds else None,
                "trained_step_s": statistics.median(trained) if trained else None,
                "makespan_vs_fifo": sum(chosen) / sum(fifo) if chosen and sum(fifo) else None}
    if is_star(system):
        # what the outside checks read: the smashed data every rank put on the wire, and both evaluations
        extra["smashed_bytes"] = sum(r["sent_by_kind"].get(k, {}).get("bytes", 0) for r in ranks
                                    for k in SMASHED_KINDS)
        for how in ("exact", "codec"):
            record = summary.get(f"eval_after_{how}")
            extra[f"eval_loss_{how}"] = record["eval_loss"] if record else None
        if extra["eval_loss_exact"] is None:  # no lossy codec: one evaluation, exact
            extra["eval_loss_exact"] = extra["eval_loss_codec"] = summary.get("eval_loss")
        extra["compress"] = {k.removeprefix("compress."): v for k, v in sets.items() if k.startswith("compress.")}
    extra["curve"] = eval_curve(out, summary)
    if sets.get("unfreeze.by") == "plateau" and module == "ringada":
        # the frontier followed the losses this run saw: the time model takes the same path
        extra["trainable_each_step"] = [json.loads(line)["trainable_blocks"]
                                        for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = summary["steps"]
    cpu = [r.get("train_cpu_s") for r in ranks]
    trainable = "all" if trains_all(system) else "top 25%"
    if system in ("ring-plateau", "ring-steps"):
        trainable = "top 25%, then more" + (" on plateaus" if system == "ring-plateau" else " every 2 steps")
    return {"system": system, "trainable": trainable, **extra,
            "tokens_per_s": summary["tokens_per_s"],
            "step_s": summary.get("train_s", summary["wall_s"]) / steps,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
            "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
            # CPU seconds of all ranks per training step: the work a system does, which bounds its speed when
            # ranks share cores
            "train_cpu_s_per_step": sum(cpu) / steps if None not in cpu else None,
            "bytes_sent": bytes_sent, "eval_loss": summary.get("eval_loss"), "steps": steps,
            "final_loss": summary.get("final_loss"), "ranks": len(ranks), "partition": summary.get("partition"),
            "rank_rows": [{k: r.get(k) for k in ("rank", "blocks", "fwd_s", "bwd_s", "wait_s", "train_cpu_s",
                                                 "peak_rss_bytes", "bytes_sent", "lookahead_mb")} for r in ranks],
            "process_s": time.perf_counter() - t0}


class Refused(RuntimeError):
    """A system's run refused its settings before training (a config error): reported as not run."""


def not_runnable(system: str, device: str, world: int) -> str | None:
    """Why ``system`` cannot run here, or None. torch.distributed.pipelining sends CUDA tensors point to point,
    which gloo does not carry, so on a GPU it needs NCCL and a GPU per rank."""
    if device != "cuda" or not system.startswith("tdp-"):
        return None
    import torch

    gpus = torch.cuda.device_count()
    if gpus >= world:
        return None
    return (f"not run: torch.distributed.pipelining sends CUDA tensors point to point, which needs NCCL and a GPU "
            f"per rank (gloo does not carry CUDA tensors); this machine has {gpus} GPU(s) for {world} ranks")


def run_bench(suite: str, out: Path, smoke: bool, repeats: int, world: int, steps: int = 4,
              profile: str | None = None, timeout: float = 1800, device: str = "cpu",
              overrides: list[str] = (), systems: list[str] | None = None, target: float | None = None) -> dict:
    """Run the suite's systems (with ``profile``: the ring or star systems ringada can emulate, on those devices
    and links, next to the simulator's prediction for the same profile) and write bench.json, bench.md and plots.
    ``device`` is run.device of every run (the simulator's prediction, from CPU block costs, is left out on a
    GPU); ``overrides`` (``key=value``) replace the shared settings (e.g. model.path, data.train)."""
    from .models import num_blocks_of

    for name, value, least in (("--repeats", repeats, 1), ("--world", world, 2), ("--steps", steps, 1)):
        if value < least:
            raise ValueError(f"{name}: got {value}; expected >= {least}")
    if profile:
        from .profiles import load_profile

        if suite not in ("ring", "star", "tta"):
            raise ValueError(f"--profile: got --suite {suite}; emulated profiles apply to the ring suite "
                             f"({', '.join(EMULATED_SYSTEMS)}), the star suite ({', '.join(EMULATED_STAR_SYSTEMS)}) "
                             f"and the tta suite ({', '.join(EMULATED_TTA_SYSTEMS)})")
        if suite == "tta" and target is None:
            raise ValueError("--target: give one with --profile; the default target comes from single-full, which "
                             "cannot be emulated (use the target of a tta run on this machine)")
        devices = len(load_profile(profile).devices)
        if devices != world:
            raise ValueError(f"--profile: {profile} has {devices} devices; expected --world ({world})")
    out.mkdir(parents=True, exist_ok=True)
    settings = base_settings(smoke, out / "data", steps)
    from .config import parse_override

    for text in overrides:
        (section, key), value = parse_override(text)
        settings[f"{section}.{key}"] = value
    settings["run.device"] = device
    num_blocks = num_blocks_of(settings["model.path"])
    suite_systems = {"ring": RING_SYSTEMS, "star": STAR_SYSTEMS, "all": RING_SYSTEMS + STAR_SYSTEMS,
                     "compress": COMPRESS_SYSTEMS, "tta": TTA_SYSTEMS}[suite]
    if suite == "tta":
        settings.setdefault("run.eval_every", 2)
    if profile:
        suite_systems = {"star": EMULATED_STAR_SYSTEMS, "tta": EMULATED_TTA_SYSTEMS}.get(suite, EMULATED_SYSTEMS)
    unknown = [s for s in systems or [] if s not in suite_systems]
    if unknown:
        raise ValueError(f"--systems: {unknown} are not in this suite; choose from {', '.join(suite_systems)}")
    systems = list(systems or suite_systems)
    cores = os.cpu_count() or 1
    skipped = {s: why for s in systems if (why := not_runnable(s, device, world))}
    systems = [s for s in systems if s not in skipped]
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(repeats):
        order = systems[rep % len(systems):] + systems[:rep % len(systems)]  # rotate to spread drift
        for system in order:
            if system in skipped:
                continue
            log.info("bench round %d/%d: %s", rep + 1, repeats, system)
            try:
                runs[system].append(run_system(system, own_settings(suite, system, settings, world),
                                               out / "runs" / f"{system}-{rep}", world, num_blocks, timeout,
                                               profile))
            except Refused as e:
                log.warning("%s: %s", system, e)
                skipped[system] = str(e)
    results = []
    for system, rs in runs.items():
        if not rs:
            continue
        merged = dict(rs[0])  # rank_rows: those of the first round
        for key in ("tokens_per_s", "step_s", "peak_rss_bytes", "bytes_sent"):
            merged[key] = statistics.median(r[key] for r in rs)
        merged["peak_rss_bytes_per_rank"] = [statistics.median(v) for v in zip(*(r["peak_rss_bytes_per_rank"]
                                                                                 for r in rs))]
        # star: medians over the rounds, like the table's
        for key in ("round_step_s", "trained_step_s", "server_step_s", "server_peak_rss_bytes",
                    "server_rss_before_model_bytes", "makespan_vs_fifo"):
            if all(r.get(key) is not None for r in rs):
                merged[key] = statistics.median(r[key] for r in rs)
        if merged["train_cpu_s_per_step"] is not None:
            merged["train_cpu_s_per_step"] = statistics.median(r["train_cpu_s_per_step"] for r in rs)
            merged["cpu_utilization"] = merged["train_cpu_s_per_step"] / (merged["step_s"] * cores)
        results.append(merged)
    if device == "cpu":
        add_predictions(results, suite, settings, world, num_blocks, cores, profile)
    by_name = {r["system"]: r for r in results}
    for r in results:
        base, ref = by_name.get("tdp-1f1b"), by_name.get(reference_of(r["system"]) or "")
        r["tokens_per_s_vs_tdp_1f1b"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["vs_tdp_1f1b_same_trainable"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    bench = {"suite": suite, "smoke": smoke, "repeats": repeats, "world_size": world, "settings": settings,
             "profile": profile, "device": device, "machine": machine(device), "results": results,
             "not_run": [{"system": s, "reason": why} for s, why in skipped.items()],
             "simulator_mean_abs_error": simulator_error(results)}
    if suite in ("star", "all"):
        bench["star_figures"] = star_figures(by_name)
    if suite == "compress":
        compression_sweep(bench)
    if suite == "tta":
        bench["target"] = time_to_target(bench["results"], target)
    write_bench(bench, out)
    plot(bench, out)
    if suite == "compress":
        plot_sweep(bench, out)
    if suite == "tta":
        plot_tta(bench, out)
    return bench


def own_settings(suite: str, system: str, settings: dict, world: int) -> dict:
    """The shared settings as ``system`` runs them: in the tta suite a star device trains a batch per step, so
    star systems get steps / devices steps (the same token budget)."""
    if suite == "tta" and is_star(system):
        return {**settings, "run.steps": max(2, settings["run.steps"] // world)}
    return settings


def add_predictions(results: list[dict], suite: str, settings: dict, world: int, num_blocks: int, cores: int,
                    profile: str | None) -> None:
    """The time model's step beside each measured one: ``predicted_step_s`` (the ranks sharing ``cores``),
    ``predicted_step_s_core_per_rank`` and ``measured_over_predicted`` (star: the rounds' steps)."""
    for r in results:
        own = own_settings(suite, r["system"], settings, world)
        r["predicted_step_s"], r["predicted_step_s_core_per_rank"] = (
            predicted_step(r["system"], own, world, num_blocks, c, profile, r.get("partition"),
                           r.get("trainable_each_step")) for c in (cores, None))
        r["measured_over_predicted"] = (r.get("round_step_s") or r["step_s"]) / r["predicted_step_s"]
        floor = None if profile else step_floor(r["system"], own, world, num_blocks, cores, r.get("partition"))
        if floor:
            r["model_cpu_s_per_step"], r["floor_step_s"] = floor["model_cpu_s"], floor["floor_s"]
            r["step_over_floor"] = r["step_s"] / floor["floor_s"]
            if r.get("train_cpu_s_per_step") is not None:
                r["cpu_over_model"] = r["train_cpu_s_per_step"] / floor["model_cpu_s"]


def simulator_error(results: list[dict]) -> float | None:
    errors = [abs(r["measured_over_predicted"] - 1) for r in results if "measured_over_predicted" in r]
    return sum(errors) / len(errors) if errors else None


def write_bench(bench: dict, out: Path) -> None:
    suite = bench["suite"]
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    (out / "bench.md").write_text(markdown_table(bench) + ("\n" + sweep_table(bench) if suite == "compress" else "")
                                  + ("\n" + tta_table(bench) if suite == "tta" else "")
                                  + ("\n" + star_figures_table(bench) if bench.get("star_figures") else ""))


def repredict(out: Path) -> dict:
    """The time model again for a finished bench (DIR/bench.json), e.g. after the block costs were measured
    anew on a quiet machine (delete the cached files under the cache's costs/); rewrites bench.json and
    bench.md."""
    from .models import num_blocks_of

    bench = json.loads((out / "bench.json").read_text())
    settings = bench["settings"]
    add_predictions(bench["results"], bench["suite"], settings, bench["world_size"],
                    num_blocks_of(settings["model.path"]), bench["machine"]["cpus"], bench.get("profile"))
    bench["simulator_mean_abs_error"] = simulator_error(bench["results"])
    if bench["suite"] in ("star", "all"):
        bench["star_figures"] = star_figures({r["system"]: r for r in bench["results"]})
    write_bench(bench, out)
    return bench


def star_figures(by_name: dict) -> dict:
    """What the star suite decides: the sfl server's memory against one server copy per device (accounted bytes
    and peak RSS, both measured on the server rank), and the server's order against FIFO: a round's training per
    local step until every device's last backward is done and its adapters reached the server (the makespan
    the order minimizes), first round left out, against the same run with star.schedule=fifo, and the wall time
    per step (aggregation, checkpoints and evaluation included) beside it; where the runs are in the bench."""
    figures: dict = {}
    sfl, copies, fifo = (by_name.get(s) for s in ("sfl", "sfl-copy-per-device", "sfl-fifo"))
    if sfl and copies:
        figures["server_memory"] = {
            "devices": sfl["ranks"] - 1,
            "held_bytes": sfl["server_held_bytes"], "copy_per_device_held_bytes": copies["server_held_bytes"],
            "held_ratio": sfl["server_held_bytes"] / copies["server_held_bytes"],
            "peak_rss_bytes": sfl["server_peak_rss_bytes"],
            "copy_per_device_peak_rss_bytes": copies["server_peak_rss_bytes"],
            "peak_rss_ratio": sfl["server_peak_rss_bytes"] / copies["server_peak_rss_bytes"]}
        before = (sfl.get("server_rss_before_model_bytes"), copies.get("server_rss_before_model_bytes"))
        if None not in before:  # what the server's role adds to the process (Python, torch and the wire left out)
            grown = [run["server_peak_rss_bytes"] - b for run, b in zip((sfl, copies), before)]
            figures["server_memory"].update({"rss_before_model_bytes": before[0], "peak_rss_growth_bytes": grown[0],
                                             "copy_per_device_peak_rss_growth_bytes": grown[1],
                                             "peak_rss_growth_ratio": grown[0] / grown[1]})
    if sfl and fifo and sfl.get("trained_step_s") and fifo.get("trained_step_s"):
        figures["order_vs_fifo"] = {"trained_step_s": sfl["trained_step_s"],
                                    "fifo_trained_step_s": fifo["trained_step_s"],
                                    "measured_ratio": sfl["trained_step_s"] / fifo["trained_step_s"],
                                    "step_s": sfl["step_s"], "fifo_step_s": fifo["step_s"],
                                    "wall_ratio": sfl["step_s"] / fifo["step_s"],
                                    "server_step_s": sfl["server_step_s"], "fifo_server_step_s": fifo["server_step_s"],
                                    "modelled_ratio": sfl.get("makespan_vs_fifo")}
    return figures


def star_figures_table(bench: dict) -> str:
    figures = bench.get("star_figures") or {}
    lines = []
    if "server_memory" in figures:
        m = figures["server_memory"]
        grown = m.get("peak_rss_growth_bytes")
        lines += ["| sfl server, devices | holds MiB | copy per device holds MiB | ratio | peak RSS MiB | "
                  "copy per device peak RSS MiB | ratio | peak RSS above start MiB | copy per device | ratio |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| {m['devices']} | {m['held_bytes'] / 2**20:.0f} | {m['copy_per_device_held_bytes'] / 2**20:.0f} | "
                  f"{m['held_ratio']:.2f} | {m['peak_rss_bytes'] / 2**20:.0f} | "
                  f"{m['copy_per_device_peak_rss_bytes'] / 2**20:.0f} | {m['peak_rss_ratio']:.2f} | "
                  + (f"{grown / 2**20:.0f} | {m['copy_per_device_peak_rss_growth_bytes'] / 2**20:.0f} | "
                     f"{m['peak_rss_growth_ratio']:.2f} |" if grown is not None else "- | - | - |"), ""]
    if "order_vs_fifo" in figures:
        o = figures["order_vs_fifo"]
        lines += ["| server order | trained s per step | FIFO's | measured ratio | modelled ratio | wall s per step "
                  "| FIFO's | wall ratio |", "|---|---|---|---|---|---|---|---|",
                  f"| sfl | {o['trained_step_s']:.2f} | {o['fifo_trained_step_s']:.2f} | {o['measured_ratio']:.3f} | "
                  f"{_num(o['modelled_ratio'], '.3f')} | {o['step_s']:.2f} | {o['fifo_step_s']:.2f} | "
                  f"{o['wall_ratio']:.3f} |", ""]
    return "\n".join(lines)


def eval_curve(out: Path, summary: dict) -> list[dict]:
    """Held-out loss against training time: [{step, tokens, train_s, eval_loss}], from the evaluation before
    training, every run.eval_every, and after. A tdp run evaluates nothing: its points are its own step times
    (summary step_elapsed_s), the losses those of the exact systems at the same step (see time_to_target)."""
    if "step_elapsed_s" in summary:
        return [{"step": i + 1, "train_s": t, "eval_loss": None} for i, t in enumerate(summary["step_elapsed_s"])]
    points = []
    before = summary.get("eval_before") or {}
    if "eval_loss" in before:
        points.append({"step": 0, "tokens": 0, "train_s": 0.0, "eval_loss": before["eval_loss"]})
    metrics = out / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        m = json.loads(line)
        if "eval_loss" in m:
            points.append({"step": m["step"] + 1, "tokens": m.get("tokens"), "train_s": m["elapsed_s"],
                           "eval_loss": m["eval_loss"]})
    after = summary.get("eval_after") or {}
    if "eval_loss" in after:
        points.append({"step": summary["steps"], "tokens": summary.get("tokens"),
                       "train_s": summary.get("train_s", summary.get("wall_s")), "eval_loss": after["eval_loss"]})
    return points


def time_to_target(results: list[dict], target: float | None = None) -> dict:
    """Fill each result's time_to_target_s and tokens_to_target (None when the budget ended first). The default
    target is 90% of the way from the starting held-out loss to what single-full reaches within the budget.
    tdp-1f1b-full trains exactly what single-full trains (every exact system ends with the same adapters), so
    its loss at a step is single-full's and its time the tdp run's own."""
    by = {r["system"]: r for r in results}
    single = by.get("single-full")
    start = next((p["eval_loss"] for r in results for p in r["curve"] if p["step"] == 0), None)
    if target is None:
        if single is None or not single["curve"] or start is None:
            raise ValueError("--target: give one, or run single-full (the default target is 90% of the way from "
                             "the starting loss to single-full's)")
        target = start + 0.9 * (single["curve"][-1]["eval_loss"] - start)
    exact = {p["step"]: p for p in (single or {}).get("curve", [])}
    for r in results:
        curve = r["curve"]
        if r["system"].startswith("tdp-"):
            tokens_per_step = (single["curve"][-1].get("tokens") or 0) / max(single["curve"][-1]["step"], 1) \
                if single else 0
            curve = [{**exact[0], "train_s": 0.0}] if 0 in exact else []
            curve += [{**p, "eval_loss": exact[p["step"]]["eval_loss"], "tokens": round(tokens_per_step * p["step"])}
                      for p in curve_of_steps(r["curve"]) if p["step"] in exact]
            r["curve"] = curve
        hit = next((p for p in curve if p["eval_loss"] is not None and p["eval_loss"] <= target), None)
        r["time_to_target_s"] = hit["train_s"] if hit else None
        r["tokens_to_target"] = hit.get("tokens") if hit else None
        r["steps_to_target"] = hit["step"] if hit else None
        r["final_eval_loss"] = curve[-1]["eval_loss"] if curve else None
    return {"loss": target, "start_loss": start}


def curve_of_steps(curve: list[dict]) -> list[dict]:
    """The points of a curve after step 0 (a tdp curve's own step times)."""
    return [p for p in curve if p["step"] > 0]


def tta_table(bench: dict) -> str:
    target = bench.get("target", {})
    lines = [f"Target held-out loss {target.get('loss', float('nan')):.4f} (start {target.get('start_loss') or 0:.4f}).",
             "", "| system | ranks | time to target s | tokens to target | steps | final held-out loss | "
             "peak RSS MiB per rank | bytes sent MB |", "|---|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        rss = " / ".join(f"{b / 2**20:.0f}" for b in r["peak_rss_bytes_per_rank"])
        lines.append(f"| {r['system']} | {r['ranks']} | {_num(r.get('time_to_target_s'), '.1f')} | "
                     f"{_num(r.get('tokens_to_target'), 'd')} | {_num(r.get('steps_to_target'), 'd')} | "
                     f"{_num(r.get('final_eval_loss'), '.4f')} | {rss} | {r['bytes_sent'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def plot_tta(bench: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in bench["results"]:
        pts = [p for p in r["curve"] if p["eval_loss"] is not None]
        ax.plot([p["train_s"] for p in pts], [p["eval_loss"] for p in pts], marker="o", ms=3, label=r["system"])
    if bench.get("target"):
        ax.axhline(bench["target"]["loss"], color="grey", ls="--", lw=0.8, label="target")
    ax.set_xlabel("training wall time, s")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_time.png", dpi=110)
    plt.close(fig)


def compression_sweep(bench: dict) -> None:
    """Set each compressed run against the uncompressed one: smashed bytes saved, held-out loss change (exact
    and through the codec), and whether it is on the Pareto front of bytes against loss."""
    results = {r["system"]: r for r in bench["results"]}
    base = results.get("sft-uncompressed")
    for r in results.values():
        if base:
            r["smashed_saving"] = 1 - r["smashed_bytes"] / base["smashed_bytes"]
            for how in ("exact", "codec"):
                mine, ref = r.get(f"eval_loss_{how}"), base.get(f"eval_loss_{how}")
                r[f"eval_loss_{how}_change"] = mine / ref - 1 if mine is not None and ref else None
        r["pareto"] = not any(o is not r and o["smashed_bytes"] <= r["smashed_bytes"]
                              and o["eval_loss_exact"] <= r["eval_loss_exact"]
                              and (o["smashed_bytes"], o["eval_loss_exact"]) != (r["smashed_bytes"],
                                                                                 r["eval_loss_exact"])
                              for o in results.values())


def sweep_table(bench: dict) -> str:
    lines = ["| setting | smashed MB | saved | eval loss (exact) | change | eval loss (codec) | change | "
             "Pareto |", "|---|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        lines.append(f"| {r['system'].removeprefix('sft-')} | {r['smashed_bytes'] / 1e6:.2f} | "
                     f"{_num(r.get('smashed_saving'), '.1%')} | {_num(r['eval_loss_exact'], '.4f')} | "
                     f"{_num(r.get('eval_loss_exact_change'), '+.2%')} | {_num(r['eval_loss_codec'], '.4f')} | "
                     f"{_num(r.get('eval_loss_codec_change'), '+.2%')} | {'yes' if r.get('pareto') else ''} |")
    return "\n".join(lines) + "\n"


def plot_sweep(bench: dict, out: Path) -> None:
    """Smashed bytes against the held-out loss's change from the uncompressed run (exact, and through the
    codec), one point per setting; the Pareto front of the exact evaluation dashed. Changes beyond the chart's
    top are drawn at its edge with their value written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    rs = sorted((r for r in bench["results"] if r.get("eval_loss_exact_change") is not None),
                key=lambda r: r["smashed_bytes"])
    if not rs:
        return
    top = 10.0  # percent
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for how, marker, color in (("exact", "o", "#4c72b0"), ("codec", "x", "#dd8452")):
        xs = [r["smashed_bytes"] / 1e6 for r in rs]
        ys = [100 * r[f"eval_loss_{how}_change"] for r in rs]
        ax.scatter(xs, [min(y, top) for y in ys], marker=marker, color=color,
                   label=f"held-out loss, {'exact' if how == 'exact' else 'through the codec'}")
        for x, y in zip(xs, ys):
            if y > top:
                ax.annotate(f"{y:+.0f}%", (x, top), textcoords="offset points", xytext=(6, -10), fontsize=8,
                            color=color)
    front = [r for r in rs if r.get("pareto")]
    ax.plot([r["smashed_bytes"] / 1e6 for r in front], [100 * r["eval_loss_exact_change"] for r in front], "--",
            color="grey", label="Pareto front (exact)")
    for i, r in enumerate(rs):
        ax.annotate(r["system"].removeprefix("sft-"), (r["smashed_bytes"] / 1e6, min(100 * r["eval_loss_exact_change"],
                    top)), textcoords="offset points", xytext=(4, -14 if i % 2 else 6), fontsize=8, rotation=0)
    ax.axhline(1.0, color="#4c72b0", lw=0.6, ls=":")
    ax.axhline(2.0, color="#dd8452", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(-0.5, top + 0.5)
    ax.set_xlabel("smashed data on the wire, MB (log)")
    ax.set_ylabel("held-out loss vs uncompressed, %")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "compression_pareto.png", dpi=110)
    plt.close(fig)


def machine(device: str) -> dict:
    import platform

    import torch

    info = {"cpus": os.cpu_count() or 1, "python": sys.version.split()[0], "torch": torch.__version__,
            "processor": platform.machine()}
    if device == "cuda":
        info.update({"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})
    return info


def predicted_step(system: str, settings: dict, world: int, num_blocks: int, cores: int | None,
                   profile: str | None = None, partition: list[int] | None = None,
                   trainable: list[int] | None = None) -> float:
    """The time model: the system's plan (its partition, schedule and trainable set) through the simulator with
    per-block costs measured once on this machine at the system's thread count, its ranks sharing ``cores``
    (None: a core per rank, as on separate devices of this machine's speed).

    tdp: torch.distributed.pipelining propagates ``requires_grad`` between stages, so autograd already stops at
    the lowest trainable adapter, as the line plan with the same trainable set does (without the lookahead,
    which is ringada's). Star: a round of
    star.local_steps steps of every device through the server's order until its last gradient is sent (what
    ``round_step_s`` measures), at this machine's speed with no link delay, or emulating ``profile``. With more
    processes than cores the block costs carry the slowdown measured while every core computes
    (:func:`costs.contention`)."""

    from . import config as config_mod
    from .costs import block_costs, contention
    from .profiles import load_profile
    from .sim import simulate_pipeline, simulate_star_step

    module, sets, procs = resolved_settings(system, settings, num_blocks, world, profile)
    if module != "ringada":  # torch.distributed.pipelining starts a step only when the last one has ended
        sets = {**sets, "pipeline.lookahead": False}
    cfg = config_mod.load(None, _set_args(sets))
    shared = cores if cores and procs > cores else None
    with _run_threads(cfg):
        rows = cfg.data.batch_size if is_star(system) else -(-cfg.data.batch_size // cfg.data.micro_batches)
        costs = block_costs(cfg, rows)
        if shared:  # every core of the box is busy at times: a block runs slower than on a quiet machine
            costs = costs.slowed(contention(cfg, rows, procs))
        if is_star(system):
            from .profiles import DeviceSpec, Profile
            from .star import make_star_topology

            topo = make_star_topology(cfg, 0, procs)
            here = Profile(server_gflops=50.0, devices=tuple(DeviceSpec(f"device{i + 1}", 50.0, float("inf"))
                                                             for i in range(world)),
                           uplink_mbps=float("inf"), downlink_mbps=float("inf"), latency_ms=0.0)
            step = simulate_star_step(cfg.pipeline.mode, topo.depths, topo.num_blocks, costs,
                                      load_profile(profile) if profile else here, cfg.star.schedule,
                                      cfg.compress.topk, shared, steps=cfg.star.local_steps,
                                      recompute=cfg.star.recompute)
            return step["server_s"]  # what round_step_s measures
        from .runtime import make_topology

        partition = partition or make_topology(cfg, 0, procs).partition  # the run's own (capacity plans vary)
        return simulate_pipeline(cfg, partition, costs, load_profile(profile) if profile else None,
                                 cores=shared, trainable=trainable)["step_s"]


@contextlib.contextmanager
def _run_threads(cfg):
    """torch's intra-op threads set to the run's (run.threads, 1 for a torchrun rank) while the block costs are
    measured or read for it, as the cost cache keys them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.run.threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def step_floor(system: str, settings: dict, world: int, num_blocks: int, cores: int,
               partition: list[int] | None = None) -> dict | None:
    """What a ring, line or single step cannot beat on this machine, from the per-block costs (measured on a
    quiet machine): ``model_cpu_s`` the compute of a step, and ``floor_s`` = max(that over the cores the ranks
    can use, the critical path: one micro-batch through every stage, forward and backward, alone, with the
    system's own settings, pipeline.lookahead included). None for the systems the model does not plan (star,
    tdp)."""

    from . import config as config_mod
    from .costs import block_costs
    from .runtime import make_topology
    from .sim import simulate_pipeline

    module, sets, procs = resolved_settings(system, settings, num_blocks, world)
    if is_star(system) or module != "ringada":
        return None
    cfg = config_mod.load(None, _set_args(sets))
    with _run_threads(cfg):
        M = cfg.data.micro_batches
        rows = -(-cfg.data.batch_size // M)
        costs = block_costs(cfg, rows)
        partition = partition or make_topology(cfg, 0, procs).partition
        step = simulate_pipeline(cfg, partition, costs)
        one = config_mod.load(None, _set_args({**sets, "data.batch_size": rows, "data.micro_batches": 1}))
        path = simulate_pipeline(one, partition, costs, steps=cfg.run.steps)["step_s"]  # one micro-batch alone
        threads_per_rank = cfg.run.threads or 1  # costs are measured at that many threads, each one busy
        cpu = step["cpu_s_per_step"] * threads_per_rank
        return {"model_cpu_s": cpu, "floor_s": max(cpu / min(cores, procs * threads_per_rank), path)}


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(bench: dict) -> str:
    """The comparison table (ratios against tdp 1F1B with the same trainable set, from the same invocation), the
    time model beside the measurements, and for star systems the server's memory and ordering."""
    results = bench["results"]
    lines = ["| system | trains | tokens/s | × tdp-1f1b, same trainable | step s | peak RSS MiB per rank | "
             "bytes sent MB | eval loss |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rss = " / ".join(f"{b / 2**20:.0f}" for b in r.get("peak_rss_bytes_per_rank", [r["peak_rss_bytes"]]))
        lines.append(f"| {r['system']} | {r.get('trainable', '-')} | {r['tokens_per_s']:.1f} | "
                     f"{_num(r.get('vs_tdp_1f1b_same_trainable'), '.2f')} | {r['step_s']:.2f} | {rss} | "
                     f"{r['bytes_sent'] / 1e6:.1f} | {_num(r['eval_loss'], '.4f')} |")
    for r in bench.get("not_run", []):
        lines.append(f"| {r['system']} | - | {r['reason']} | - | - | - | - | - |")
    cores = bench.get("machine", {}).get("cpus", "all")
    model = f"{cores} shared cores" + (f", {bench['profile']}'s speeds and links" if bench.get("profile") else "")
    lines += ["", f"| system | step s (star: rounds' training) | predicted step s ({model}) | measured / predicted | "
              "simulator error | "
              "predicted step s, a core per rank | CPU s per step (all ranks) | CPU busy |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r.get("measured_over_predicted")
        lines.append(f"| {r['system']} | {r.get('round_step_s') or r['step_s']:.2f} | "
                     f"{_num(r.get('predicted_step_s'), '.2f')} | "
                     f"{_num(ratio, '.2f')} | {_num(None if ratio is None else ratio - 1, '+.0%')} | "
                     f"{_num(r.get('predicted_step_s_core_per_rank'), '.2f')} | "
                     f"{_num(r.get('train_cpu_s_per_step'), '.2f')} | {_num(r.get('cpu_utilization'), '.0%')} |")
    errors = [abs(r["measured_over_predicted"] - 1) for r in results if r.get("measured_over_predicted")]
    if errors:
        mean = sum(errors) / len(errors)
        lines += ["", f"Simulator error (measured / predicted − 1): largest {max(errors):.0%}, mean {mean:.0%} over "
                  f"{len(errors)} systems; {sum(e <= 0.15 for e in errors)} of {len(errors)} within 15%."]
    floors = [r for r in results if r.get("floor_step_s")]
    if floors:
        lines += ["", "| system | CPU s per step | the cost model's | CPU / model | CPU busy | floor s (max of compute "
                  "over cores, critical path) | step / floor |", "|---|---|---|---|---|---|---|"]
        for r in floors:
            lines.append(f"| {r['system']} | {_num(r.get('train_cpu_s_per_step'), '.2f')} | "
                         f"{r['model_cpu_s_per_step']:.2f} | {_num(r.get('cpu_over_model'), '.2f')} | "
                         f"{_num(r.get('cpu_utilization'), '.0%')} | {r['floor_step_s']:.2f} | "
                         f"{r['step_over_floor']:.2f} |")
    lines += ["", breakdown_table(results, emulated=bool(bench.get("profile")))]
    star = [r for r in results if "server_held_bytes" in r]
    if star:
        lines += ["", "| system | server holds MiB | one copy per device would hold MiB | makespan / FIFO |",
                  "|---|---|---|---|"]
        for r in star:
            ms = f"{r['makespan_vs_fifo']:.3f}" if r["makespan_vs_fifo"] else "-"
            lines.append(f"| {r['system']} | {r['server_held_bytes'] / 2**20:.1f} | "
                         f"{r['server_copy_per_device_bytes'] / 2**20:.1f} | {ms} |")
    return "\n".join(lines) + "\n"


def breakdown_table(results: list[dict], emulated: bool = False) -> str:
    """Per rank and training step (first round): seconds of forward and backward compute, seconds waiting for
    messages, and the CPU seconds spent outside compute (gloo's threads, copies, Python), from the ranks' rows.
    Emulated compute includes its sleeps, so there the last figure is left out."""
    lines = ["| system | per rank, per step: forward / backward / waiting / CPU outside compute (s) |", "|---|---|"]
    for r in results:
        rows, steps = r.get("rank_rows") or [], r.get("steps")
        if not steps:  # results written before steps were recorded: no per-step figures
            continue
        cells = []
        for row in rows:
            if None in (row.get("fwd_s"), row.get("bwd_s"), row.get("wait_s")):
                continue
            other = None
            if row.get("train_cpu_s") is not None and not emulated:
                other = row["train_cpu_s"] - row["fwd_s"] - row["bwd_s"]
            cells.append(f"r{row['rank']} {row['fwd_s'] / steps:.2f} / {row['bwd_s'] / steps:.2f} / "
                         f"{row['wait_s'] / steps:.2f} / {_num(None if other is None else other / steps, '.2f')}")
        if cells:
            lines.append(f"| {r['system']} | {'; '.join(cells)} |")
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


# ------------------------------------------------------------------------------------------- decoding bench

GENERATE_SYSTEMS = ["single-generate", "single-generate-batched", "ring-generate", "ring-generate-batched"]
GENERATE_PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "KING RICHARD III:", "HAMLET:", "MACBETH:", "OTHELLO:",
                    "PORTIA:"]


def generate_settings(system: str, prompts: int, world: int) -> tuple[int, dict]:
    """(processes, generate options) of a decoding system. ``single-generate`` takes one prompt at a time (what
    a loop over ``generate`` does); ``-batched`` puts the prompts in as few micro-batches as keep every rank
    busy; the ring keeps ``world`` micro-batches in flight."""
    if system == "single-generate":
        return 1, {"batch_size": 1, "in_flight": 1}
    if system == "single-generate-batched":
        return 1, {"batch_size": prompts, "in_flight": 1}
    if system == "ring-generate":
        return world, {"batch_size": 1, "in_flight": world}
    if system == "ring-generate-batched":
        return world, {"batch_size": max(1, -(-prompts // world)), "in_flight": world}
    raise ValueError(f"unknown decoding system {system!r}; choose from {', '.join(GENERATE_SYSTEMS)}")


def run_generate_bench(out: Path, smoke: bool, world: int, max_new_tokens: int = 32, adapter: str | None = None,
                       overrides: list[str] = (), systems: list[str] | None = None, timeout: float = 1800) -> dict:
    """Decode the same prompts with the same adapter in one process and across the ring (greedy), and compare
    tokens/s (prefill and decode), peak memory per rank and bytes on the wire. Every system must produce the
    same tokens (``same_tokens``). Writes DIR/bench.json and DIR/bench.md."""
    import yaml

    from .config import load

    if world < 2:
        raise ValueError(f"--world: got {world}; expected >= 2")
    unknown = [s for s in systems or [] if s not in GENERATE_SYSTEMS]
    if unknown:
        raise ValueError(f"--systems: {unknown} are not in this suite; choose from {', '.join(GENERATE_SYSTEMS)}")
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in base_settings(smoke, out / "data").items() if k.startswith(("model.", "adapter."))}
    from .config import parse_override

    for text in overrides:
        (section, key), value = parse_override(text)
        settings[f"{section}.{key}"] = value
    cfg = load(None, _set_args({**settings, "run.out_dir": str(out / "adapter-run")}))
    prompts_file = out / "prompts.jsonl"
    if smoke:
        import random

        rng = random.Random(0)
        prompts = [{"input_ids": [rng.randrange(3, 256) for _ in range(rng.randrange(4, 12))]}
                   for _ in range(2 * world)]
    else:
        prompts = [{"text": p} for p in (GENERATE_PROMPTS * world)[:2 * world]]
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    if adapter is None:  # the run's initial adapter: decoding speed does not depend on the values
        from .adapters import add_adapters, save_adapters
        from .models import load_model, resolve_model_dir

        cut = load_model(cfg.model.path, "causal_lm", seed=cfg.run.seed)
        made = add_adapters(cut, cfg.adapter, cfg.run.seed, base_dir=str(resolve_model_dir(cfg.model.path)))
        adapter = str(save_adapters(out / "adapter", made.state_dict(), made.config_json))
        del cut
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    results, tokens = [], {}
    for system in systems or GENERATE_SYSTEMS:
        procs, opts = generate_settings(system, len(prompts), world)
        run_out = out / "runs" / f"{system}.jsonl"
        args = ["generate", "--config", str(config_path), "--adapter", adapter, "--prompts", str(prompts_file),
                "--max-new-tokens", str(max_new_tokens), "--batch-size", str(opts["batch_size"]),
                "--in-flight", str(opts["in_flight"]), "--out", str(run_out)]
        if procs == 1:
            args = ["--set", f"run.threads={os.cpu_count() or 1}", *args[1:]]
            cmd = [sys.executable, "-m", "ringada", "generate", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
                   "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "ringada", *args]
        log.info("generate bench: %s", system)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{system} failed:\n{result.stderr[-3000:]}")
        summary = json.loads(run_out.with_name(run_out.stem + ".summary.json").read_text())
        tokens[system] = [json.loads(line)["tokens"] for line in run_out.read_text().splitlines()]
        ranks = summary["ranks"]
        results.append({"system": system, "ranks": len(ranks), **opts,
                        "prefill_tokens_per_s": summary["prefill_tokens_per_s"],
                        "decode_tokens_per_s": summary["decode_tokens_per_s"], "wall_s": summary["wall_s"],
                        "new_tokens": summary["new_tokens"],
                        "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
                        "model_bytes_per_rank": [r["model_bytes"] for r in ranks],
                        "kv_cache_peak_bytes_per_rank": [r["kv_cache_peak_bytes"] for r in ranks],
                        "bytes_sent": sum(r["bytes_sent"] for r in ranks)})
    first = next(iter(tokens.values()))
    for r in results:
        r["same_tokens"] = tokens[r["system"]] == first
    bench = {"suite": "generate", "smoke": smoke, "world_size": world, "max_new_tokens": max_new_tokens,
             "prompts": len(prompts), "adapter": adapter, "settings": settings, "machine": machine("cpu"),
             "results": results}
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    (out / "bench.md").write_text(generate_table(bench))
    return bench


def generate_table(bench: dict) -> str:
    lines = ["| system | ranks | prompts per micro-batch × in flight | prefill tokens/s | decode tokens/s | "
             "peak RSS MiB per rank | model MiB per rank | KV cache MiB per rank | bytes sent MB | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in bench["results"]:
        def per_rank(key):
            return " / ".join(f"{b / 2**20:.0f}" if b >= 2**20 else f"{b / 2**20:.2f}" for b in r[key])
        lines.append(f"| {r['system']} | {r['ranks']} | {r['batch_size']} × {r['in_flight']} | "
                     f"{_num(r['prefill_tokens_per_s'], '.0f')} | {_num(r['decode_tokens_per_s'], '.1f')} | "
                     f"{per_rank('peak_rss_bytes_per_rank')} | {per_rank('model_bytes_per_rank')} | "
                     f"{per_rank('kv_cache_peak_bytes_per_rank')} | {r['bytes_sent'] / 1e6:.2f} | "
                     f"{'yes' if r['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"
