"""Ring and line on real gloo processes equal a plain transformers + peft loop on the same batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ringada import schedule as sched
from ringada.comm import HEADER_BYTES
from ringada.config import from_dict
from ringada.data import load_dataset
from ringada.train import trainable_count
from tests.reference import _LAYER, assert_adapters_equal, reference_train


def _cfg(out, model_dir, data, *, mode="ring", partition="even", schedule="1f1b", micro=2, kind="lora",
         task="causal_lm", labels=0, unfreeze=None, optim=None, steps=5, batch=6, seq_len=16):
    return {
        "run": {"out_dir": str(out), "seed": 3, "steps": steps, "eval_batches": 2, "message_log": True},
        "model": {"path": str(model_dir), "task": task, "num_labels": labels},
        "adapter": {"kind": kind, "r": 4, "alpha": 8},
        "data": {"train": str(data), "eval": str(data), "seq_len": seq_len, "batch_size": batch,
                 "micro_batches": micro, "shuffle": True},
        "optim": {"lr": 0.01, **(optim or {})},
        "pipeline": {"mode": mode, "schedule": schedule, "partition": partition},
        "unfreeze": unfreeze or {},
    }


def _check_against_reference(raw, model_dir, data, num_blocks=4):
    """Final adapters and per-step losses equal the reference; returns (summary, metrics, cfg)."""
    cfg = from_dict(raw)
    out = cfg.run.out_dir
    task = cfg.model.task
    ds = load_dataset(str(data), "train", task=task, seq_len=cfg.data.seq_len, num_labels=cfg.model.num_labels)
    steps, frontiers = [], []
    for s in range(cfg.run.steps):
        epoch, batch = ds.batch_at(s, cfg.data.batch_size, cfg.data.shuffle, cfg.run.seed)
        steps.append([(m.input_ids, m.labels, m.attention_mask) for m in batch.split(cfg.data.micro_batches)])
        frontiers.append(num_blocks - trainable_count(cfg.unfreeze, num_blocks, s, epoch, 0))
    want, want_losses = reference_train(str(model_dir), f"{out}/adapter_init", steps, frontiers=frontiers,
                                        lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                        grad_clip=cfg.optim.grad_clip, task=task, num_labels=cfg.model.num_labels,
                                        kind=cfg.adapter.kind)
    assert_adapters_equal(load_file(f"{out}/adapter/adapter_model.safetensors"), want)
    metrics = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in metrics], dtype=torch.float64),
                               torch.tensor(want_losses, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert [m["frontier"] for m in metrics] == frontiers
    init = load_file(f"{out}/adapter_init/adapter_model.safetensors")
    final = load_file(f"{out}/adapter/adapter_model.safetensors")
    never_trained = [k for k in init if (m := _LAYER.search(k)) and int(m.group(1)) < min(frontiers)]
    assert all(torch.equal(final[k], init[k]) for k in never_trained)  # frozen adapters stay bit-identical
    summary = json.loads(open(f"{out}/summary.json").read())
    return summary, metrics, cfg


def _check_messages(summary, metrics, cfg, out):
    """Every rank sent exactly the activation/gradient messages its plans name, over all steps and evals."""
    world = summary["world_size"]
    expected = {r: [] for r in range(world)}
    mode = "ring" if cfg.pipeline.mode == "ring" else "line"
    head_trainable = cfg.model.task == "classification"
    for m in metrics:
        plan = sched.build_schedule(mode, summary["partition"], cfg.data.micro_batches, m["frontier"],
                                    head_trainable, cfg.pipeline.schedule)
        for msg in plan.messages():
            expected[msg.src].append(["activation" if msg.kind == "F" else "gradient", msg.dst, m["step"], msg.mb])
    got = {r: [row for row in json.load(open(f"{out}/messages/rank{r}.json")) if row[2] >= 0
               and row[0] in ("activation", "gradient")] for r in range(world)}
    for r in range(world):
        assert sorted(got[r]) == sorted(expected[r]), f"rank {r}"


CASES = {
    "ring2-uneven-gpipe-3mb-moving-frontier-clip": dict(
        world=2, family="llama", partition=[1, 3], schedule="gpipe", micro=3,
        unfreeze={"initial": 1, "every": 2, "increment": 1}, optim={"weight_decay": 0.1, "grad_clip": 0.05}),
    # rank 0 plans the split from the costs it measures, the other rank takes it
    "ring2-gpt2-1f1b-6mb-fastest-split": dict(world=2, family="gpt2", partition="fastest", schedule="1f1b", micro=6),
    "ring2-bottleneck-1mb": dict(world=2, family="llama", partition=[2, 2], schedule="1f1b", micro=1,
                                 kind="bottleneck", unfreeze={"initial": 1, "every": 1, "increment": 2}),
    "ring4-empty-initiator-1f1b-5mb-frontier-crosses-ranks": dict(
        world=4, family="llama", partition=[0, 1, 2, 1], schedule="1f1b", micro=5,
        unfreeze={"initial": 0, "every": 1, "increment": 1}),
    "ring4-gpt2-gpipe-8mb-bottleneck": dict(world=4, family="gpt2", partition=[1, 1, 1, 1], schedule="gpipe",
                                            micro=8, kind="bottleneck", batch=8),
    "line4-1f1b-2mb": dict(world=4, family="llama", mode="line", partition=[1, 1, 1, 1], schedule="1f1b", micro=2,
                           unfreeze={"initial": 2, "every": 2, "increment": 1}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_distributed_equals_reference(name, request, tmp_path, tiny_dirs, token_jsonl):
    case = dict(CASES[name])
    pool = request.getfixturevalue(f"pool{case.pop('world')}")
    model_dir = tiny_dirs[case.pop("family")]
    raw = _cfg(tmp_path / "out", model_dir, token_jsonl, **case)
    pool.run(raw)
    summary, metrics, cfg = _check_against_reference(raw, model_dir, token_jsonl)
    _check_messages(summary, metrics, cfg, tmp_path / "out")
    assert summary["world_size"] == pool.world_size and len(summary["ranks"]) == pool.world_size


def test_ring_classification_with_padding(pool4, tmp_path, tiny_dirs):
    rows = [{"input_ids": [(5 * i + j) % 120 + 1 for j in range(2 + i % 11)], "label": i % 3} for i in range(60)]
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    # the initiator holds no block, only the embedding and the classifier (which always trains)
    raw = _cfg(tmp_path / "out", tiny_dirs["bert"], path, task="classification", labels=3, partition=[0, 2, 1, 1],
               micro=3, unfreeze={"initial": 0, "every": 2, "increment": 2})
    pool4.run(raw)
    summary, metrics, cfg = _check_against_reference(raw, tiny_dirs["bert"], path)
    _check_messages(summary, metrics, cfg, tmp_path / "out")
    assert metrics[0]["frontier"] == 4 and summary["eval_after"]["eval_accuracy"] >= 0


def test_frontier_on_top_rank_leaves_lower_ranks_forward_only(pool4, tmp_path, tiny_dirs, token_jsonl):
    """Only the top rank's block trains: ranks 1 and 2 do no backward, get no gradient, send activations only."""
    raw = _cfg(tmp_path / "out", tiny_dirs["llama"], token_jsonl, partition=[1, 1, 1, 1], micro=3,
               unfreeze={"initial": 1, "every": 100})
    pool4.run(raw)
    summary, metrics, cfg = _check_against_reference(raw, tiny_dirs["llama"], token_jsonl)
    ranks = summary["ranks"]
    hidden = 32
    for r in (1, 2):
        assert ranks[r]["bwd_s"] == 0.0
        assert ranks[r]["recv_by_kind"]["gradient"]["messages"] == 0
        assert ranks[r]["sent_by_kind"]["gradient"]["messages"] == 0
        act = ranks[r]["sent_by_kind"]["activation"]
        # train steps + (before, after) x 2 eval batches, each split into micro-batches too
        forwards = (cfg.run.steps + 2 * 2) * cfg.data.micro_batches
        rows = cfg.run.steps * cfg.data.batch_size + 2 * 2 * cfg.data.batch_size
        assert act["messages"] == forwards
        assert act["bytes"] == forwards * HEADER_BYTES + rows * cfg.data.seq_len * hidden * 4
        train_rows = cfg.run.steps * cfg.data.batch_size  # training steps alone: no eval traffic
        assert ranks[r]["train_bytes_sent"] == (cfg.run.steps * cfg.data.micro_batches * HEADER_BYTES
                                                + train_rows * cfg.data.seq_len * hidden * 4)
    assert ranks[3]["bwd_s"] > 0 and ranks[3]["sent_by_kind"]["gradient"]["messages"] == 0
    assert ranks[0]["sent_by_kind"]["gradient"]["messages"] == cfg.run.steps * cfg.data.micro_batches


def test_without_early_stop_every_rank_backpropagates_and_learns_the_same(pool4, tmp_path, tiny_dirs, token_jsonl):
    """pipeline.early_stop=false (the ablation): the same adapters, but backward runs through every rank."""
    raw = _cfg(tmp_path / "out", tiny_dirs["llama"], token_jsonl, partition=[1, 1, 1, 1], micro=3,
               unfreeze={"initial": 1, "every": 100})
    raw["pipeline"]["early_stop"] = False
    pool4.run(raw)
    summary, metrics, cfg = _check_against_reference(raw, tiny_dirs["llama"], token_jsonl)
    for r, row in enumerate(summary["ranks"]):
        assert row["bwd_s"] > 0, f"rank {r}"
        # each rank sends one gradient per micro-batch: rank 0 from the head, ranks 1..3 down the ring
        assert row["sent_by_kind"]["gradient"]["messages"] == cfg.run.steps * cfg.data.micro_batches, f"rank {r}"


def test_ring_links_through_the_compress_codec(pool2, tmp_path, tiny_dirs, token_jsonl):
    """pipeline.compress: a lossless codec leaves the ring exact (it still equals the reference) and sends its
    activations and gradients as coded blobs; an 8-bit codec sends fewer bytes and still trains."""
    from ringada.config import from_dict

    sizes = {}
    for name, comp in {"plain": None, "lossless": {"lossless": "zlib"},
                       "int8": {"bits": 8, "scale": "token", "rounding": "nearest"}}.items():
        raw = _cfg(tmp_path / name, tiny_dirs["llama"], token_jsonl, partition=[1, 3], micro=2, seq_len=32)
        if comp:
            raw["pipeline"]["compress"] = True
            raw["compress"] = comp
        pool2.run(raw)
        if name != "int8":
            _check_against_reference(raw, tiny_dirs["llama"], token_jsonl)
        summary = json.loads(open(tmp_path / name / "summary.json").read())
        sizes[name] = sum(r["sent_by_kind"][k]["bytes"] for r in summary["ranks"] for k in ("activation", "gradient"))
        assert from_dict(raw).pipeline.compress == bool(comp)
    # a tiny model: message and blob headers weigh on 3 x 32 x 32 activations, so 8 bits save about half
    assert sizes["int8"] < 0.6 * sizes["plain"] and sizes["lossless"] != sizes["plain"]
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "int8" / "metrics.jsonl")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("mode", ["ring", "line"])
def test_lookahead_runs_the_next_frozen_first_stage_while_waiting_and_learns_the_same(
        mode, pool2, tmp_path, tiny_dirs, token_jsonl):
    """pipeline.lookahead: while rank 0 waits for a step's sum, it runs the next step's first stage when that
    stage is frozen in both steps; the adapters and losses still equal the reference, evaluations between steps
    included. Links held for 150 ms make rank 0 wait at the end of every step. Ring [1, 3]: stage 0 (block 0)
    stays frozen, so every step but the last runs ahead. Line [3, 1]: the frontier reaches stage 0's blocks at
    step 2, so only step 0 runs step 1's stage ahead."""
    profile = tmp_path / "slow-links.yaml"
    profile.write_text("reference_gflops: 50\ndevices:\n  - {gflops: 50, memory_mb: 100}\n"
                       "  - {gflops: 50, memory_mb: 100}\nlinks: {uplink_mbps: 1000, latency_ms: 150}\n")
    counts = {}
    for lookahead in (True, False) if mode == "ring" else (True,):
        out = tmp_path / f"{mode}-{lookahead}"
        raw = _cfg(out, tiny_dirs["llama"], token_jsonl, mode=mode, partition=[1, 3] if mode == "ring" else [3, 1],
                   micro=2, steps=4, unfreeze={"initial": 1, "every": 2, "increment": 1})
        raw["run"]["eval_every"] = 2
        raw["pipeline"].update({"profile": str(profile), "emulate": True, "lookahead": lookahead})
        pool2.run(raw)
        summary, metrics, cfg = _check_against_reference(raw, tiny_dirs["llama"], token_jsonl)
        _check_messages(summary, metrics, cfg, out)
        counts[lookahead] = [r["lookahead_mb"] for r in summary["ranks"]]
    steps, micro = 4, 2
    if mode == "ring":
        assert counts[False] == [0, 0]
        assert counts[True][1] == 0 and steps - 1 <= counts[True][0] <= (steps - 1) * micro
    else:
        assert counts[True][1] == 0 and 1 <= counts[True][0] <= micro


def test_lookahead_stopped_mid_stage_is_continued_from_where_it_stopped(tiny_dirs, token_jsonl, tmp_path):
    """The lookahead runs a stage a chunk of blocks at a time and stops when the step's sum has come, maybe
    mid-stage; the next step's forward continues from the block where it stopped, with the same output, bit for
    bit, as the forward run whole (adapter dropout drawn per block). Rank 0 of a line [3, 1], driven by hand:
    nothing here needs the other rank."""
    from ringada.runtime import Ahead, PipelineRuntime, make_topology

    raw = _cfg(tmp_path, tiny_dirs["llama"], token_jsonl, mode="line", partition=[3, 1], micro=2,
               unfreeze={"initial": 1, "every": 100})
    raw["adapter"]["dropout"] = 0.5
    cfg = from_dict(raw)
    rt = PipelineRuntime(cfg, make_topology(cfg, 0, 2))
    ds = load_dataset(str(token_jsonl), "train", task="causal_lm", seq_len=cfg.data.seq_len)
    _, batch = ds.batch_at(1, cfg.data.batch_size, True, cfg.run.seed)
    plan, micro = rt.plan(2, 3, train=True), batch.split(2)

    def forward(mb):
        outputs = {}
        rt._forward(plan.stages[0], mb, (0, mb), 1, True, False, plan, micro, None, 0, {}, {}, outputs, {})
        return outputs[(0, mb)][0]

    whole = [forward(0), forward(1)]
    ahead = rt._lookahead(plan, lambda: Ahead(1, 3, batch), 2)
    assert [next(ahead) for _ in range(4)] == [0, 0, 0, 1]  # one block a chunk: mb 0 whole, mb 1's first block
    assert (rt._ahead[(1, 0)].block, rt._ahead[(1, 1)].block, rt.timers.lookahead_mb) == (3, 1, 1)
    continued = [forward(0), forward(1)]
    assert not rt._ahead
    assert all(torch.equal(a, b) for a, b in zip(whole, continued))
    assert not torch.equal(whole[0], whole[1])
