"""`ringada train` under real torchrun: config errors stop every rank before any collective; a 3-rank ring whose
frontier stays on the top rank leaves the middle rank forward-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    """Every rank rejects the config on its own, so none waits for a peer (the pure config tests cover the rest)."""
    extra = ["--set", "pipeline.partition=[1, 1, 1]"]
    result = _torchrun(3, _args(tmp_path / "out", tiny_dirs["llama"], token_jsonl, *extra), timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("pipeline.partition: got [1, 1, 1] (sum 3) but the model has 4 blocks") == 3
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
