"""`ringada train` under real torchrun: config errors stop every rank before any collective; a 3-rank ring whose
frontier stays on the top rank leaves the middle rank forward-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ringada.comm import HEADER_BYTES
from tests.ranks import REPO, free_port


def _torchrun(n: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "ringada", "train", *args]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _args(out, model_dir, data, *extra):
    return ["--set", f"run.out_dir={out}", "--set", f"model.path={model_dir}", "--set", f"data.train={data}",
            "--set", f"data.eval={data}", "--set", "data.seq_len=16", "--set", "data.batch_size=4",
            "--set", "pipeline.mode=ring", "--set", "run.steps=3", "--set", "run.eval_batches=1", *extra]


def test_config_errors_stop_all_ranks_before_any_collective(tmp_path, tiny_dirs, token_jsonl):
    """Every rank rejects the config on its own, so none waits for a peer (the pure config tests cover the rest).

    The ranks are started as torchrun would start them (its environment variables) but each on its own: torchrun
    itself stops the remaining workers once one fails, which would hide a rank that hangs."""
    extra = ["--set", "pipeline.partition=[1, 1, 1]"]
    port = free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"}
    cmd = [sys.executable, "-m", "ringada", "train", *_args(tmp_path / "out", tiny_dirs["llama"], token_jsonl, *extra)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(3)]
    try:
        results = [p.communicate(timeout=120) for p in procs]  # a rank waiting for a peer would time out here
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 2
        assert "pipeline.partition: got [1, 1, 1] (sum 3) but the model has 4 blocks" in err
    assert not (tmp_path / "out" / "adapter").exists()


def test_three_rank_ring_with_frontier_on_top_rank(tmp_path, tiny_dirs, token_jsonl):
    out = tmp_path / "out"
    result = _torchrun(3, _args(out, tiny_dirs["llama"], token_jsonl, "--set", "pipeline.partition=[1, 2, 1]",
                                "--set", "data.micro_batches=2", "--set", "unfreeze.initial=1",
                                "--set", "unfreeze.every=1000"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    middle = summary["ranks"][1]
    assert middle["blocks"] == [1, 3] and middle["bwd_s"] == 0.0
    assert middle["sent_by_kind"]["gradient"]["messages"] == middle["recv_by_kind"]["gradient"]["messages"] == 0
    # what the middle rank sent is forward activations (and its adapters once at start, once at the end) only
    activations = (3 + 2) * 2  # 3 train steps + 2 evals of 1 batch, 2 micro-batches each
    sent = middle["sent_by_kind"]
    assert sent["activation"] == {"messages": activations,
                                  "bytes": activations * HEADER_BYTES + (3 + 2) * 4 * 16 * 32 * 4}
    assert middle["bytes_sent"] == sent["activation"]["bytes"] + sent["adapters"]["bytes"]
    assert summary["ranks"][2]["bwd_s"] > 0  # the top rank trains
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["trainable_blocks"] for m in metrics] == [1, 1, 1]


def test_tdp_baseline_trains_the_same_model(tmp_path, tiny_dirs, token_jsonl):
    """The torch.distributed.pipelining baseline sees the same batches and losses as the plain peft reference
    (so benchmark comparisons are like for like)."""
    from ringada.config import load
    from ringada.data import load_dataset
    from tests.reference import reference_train

    out = tmp_path / "out"
    sets = ["model.path=" + str(tiny_dirs["llama"]), f"data.train={token_jsonl}", "data.eval=null",
            "data.seq_len=16", "data.batch_size=4", "data.micro_batches=2", "run.steps=3", f"run.out_dir={out}",
            "optim.lr=0.01", "pipeline.mode=line"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "ringada.baselines.tdp", "--schedule", "1f1b"]
    for s in sets:
        cmd += ["--set", s]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    cfg = load(None, sets)
    ds = load_dataset(str(token_jsonl), "train", task="causal_lm", seq_len=16)
    steps = [[(m.input_ids, m.labels, None) for m in ds.batch_at(s, 4, True, cfg.run.seed)[1].split(2)]
             for s in range(3)]
    # the reference starts from adapters drawn exactly as ringada draws them (LoRA B = 0: the first loss only
    # depends on the base model and the batch); later losses follow the same AdamW updates
    from ringada.models import load_model
    from ringada.adapters import add_adapters, save_adapters
    cut = load_model(str(tiny_dirs["llama"]))
    init = add_adapters(cut, cfg.adapter, cfg.run.seed)
    save_adapters(tmp_path / "init", init.state_dict(), init.config_json)
    _, want_losses = reference_train(str(tiny_dirs["llama"]), str(tmp_path / "init"), steps, frontiers=[0] * 3,
                                     lr=0.01)
    # tdp averages per-micro-batch means (scale_grads); with equal micro-batches that is the batch mean
    assert summary["losses"] == pytest.approx(want_losses, rel=1e-5)
