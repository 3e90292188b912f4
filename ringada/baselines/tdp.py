"""torch.distributed.pipelining baseline: the same model slices, LoRA and trainable set as a `line` run, driven
by the public PipelineStage with ScheduleGPipe / Schedule1F1B. torch's pipelining passes requires_grad between
stages, so a stage whose input needs no gradient runs no backward: autograd itself stops at the lowest trainable
adapter (at stage granularity between ranks).

    torchrun --nproc-per-node 4 -m ringada.baselines.tdp --config FILE --schedule 1f1b [--set k=v ...]

Writes summary.json (the fields of a ringada run) and adapter/ to run.out_dir on rank 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import config as config_mod
from ..adapters import add_adapters
from ..cli import setup_logging
from ..comm import Counters, start_world
from ..launch import placement, world_from_env
from ..runtime import gather_rank_rows, make_topology
from ..data import Batch
from ..train import input_tokens, load_run_data, loss_sum, make_optimizer, trainable_count

log = logging.getLogger(__name__)


class StageModule(nn.Module):
    def __init__(self, cut, lo: int, hi: int):
        super().__init__()
        self.cut, self.lo, self.hi = cut, lo, hi
        self.model = cut.model  # registers the parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cut = self.cut
        if cut.has_embed:
            with torch.no_grad():
                x = cut.embed(x)
        ctx = cut.context(x, None)
        for i in range(self.lo, self.hi):
            x = cut.run_block(i, x, ctx)
        return cut.head(x, None) if cut.has_head else x


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    parser = argparse.ArgumentParser(prog="ringada.baselines.tdp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
    args = parser.parse_args(argv)
    rank, world = world_from_env()
    setup_logging(rank)
    cfg = config_mod.load(args.config, ["pipeline.mode=line", *args.overrides])
    topo = make_topology(cfg, rank, world)
    # P2P of CUDA tensors needs NCCL (a GPU per rank); on the CPU, gloo
    device, _ = placement(cfg)
    groups = start_world(rank, world, cfg.run.timeout_s, "nccl" if device.type == "cuda" else "gloo")
    try:
        lo, hi = topo.blocks
        from ..models import load_model

        cut = load_model(cfg.model.path, cfg.model.task, cfg.model.num_labels, blocks=(lo, hi),
                         embed=rank == 0, head=rank == world - 1, seed=cfg.run.seed)
        adapters = add_adapters(cut, cfg.adapter, cfg.run.seed)
        cut.model.to(device)
        L = cut.num_blocks
        adapters.set_frontier(L - trainable_count(cfg.unfreeze, L, 0, 0, 0))  # the same (fixed) trainable set
        optimizer = make_optimizer(cfg, adapters)
        M = cfg.data.micro_batches

        def loss_fn(logits, target):
            return loss_sum(logits, target) / Batch(target, target).count()

        stage = PipelineStage(StageModule(cut, lo, hi), rank, world, device, group=groups[0] if groups else None)
        schedule = (ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B)(stage, M, loss_fn=loss_fn)
        data = load_run_data(cfg, cut.model.config.vocab_size) if rank in (0, world - 1) else None
        tokens, start, cpu0, losses_log, step_times = 0, time.perf_counter(), time.process_time(), [], []
        for step in range(cfg.run.steps):
            batch = data.train.batch_at(step, cfg.data.batch_size, cfg.data.shuffle, cfg.run.seed)[1].to(device) \
                if data else None
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            if rank == 0:
                schedule.step(batch.input_ids)
            elif rank == world - 1:
                losses = []
                schedule.step(target=batch.labels, losses=losses)
                losses_log.append(float(sum(l.detach() for l in losses)) / len(losses))
            else:
                schedule.step()
            if optimizer is not None:
                optimizer.step()
            if batch is not None:
                tokens += input_tokens(batch)
            step_times.append(time.perf_counter() - start)  # the last stage's end of each step
        # a stage without backward finishes its last step before the stages above it: wait for all of them, so
        # that the time covers every rank's work (a ringada step ends in an all_reduce the same way)
        dist.barrier()
        wall, train_cpu = time.perf_counter() - start, time.process_time() - cpu0
        ranks = gather_rank_rows(world, {"rank": rank, "blocks": [lo, hi], "fwd_s": 0.0, "bwd_s": 0.0,
                                         "train_cpu_s": train_cpu}, Counters())
        losses_t = torch.tensor(losses_log or [0.0] * cfg.run.steps, dtype=torch.float64)
        if rank != world - 1:
            losses_t.zero_()
        dist.all_reduce(losses_t)  # the last stage's per-step losses, to rank 0
        times_t = torch.tensor(step_times, dtype=torch.float64)
        if rank != world - 1:
            times_t.zero_()
        dist.all_reduce(times_t)
        if rank == 0:
            out = Path(cfg.run.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            summary = {"mode": f"tdp-{args.schedule}", "world_size": world, "steps": cfg.run.steps,
                       "final_loss": losses_t[-1].item(), "losses": losses_t.tolist(), "tokens": tokens,
                       "step_elapsed_s": times_t.tolist(), "tokens_per_s": tokens / wall, "wall_s": wall,
                       "train_s": wall, "partition": topo.partition, "micro_batches": M, "ranks": ranks}
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("tdp-%s: %.1f tokens/s, %.2f s/step", args.schedule, tokens / wall, wall / cfg.run.steps)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
