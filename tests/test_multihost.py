"""A ring across three "hosts" (network namespaces with their own address, hostname and /etc/hosts), each started
with the unchanged `launch/ring_multinode.sh`, i.e. torchrun's c10d rendezvous + gloo over a real (veth) network.

torchrun's c10d rendezvous hosts its TCP store on the agent whose own hostname or addresses match the endpoint,
so each namespace needs a hostname of its own and the endpoint is given as `host1:PORT` (resolved through the
namespace's hosts file). Needs root; skips otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.netns import NetnsCluster, unavailable_reason
from tests.ranks import REPO

NODES = 3
STEPS = 2
TIMEOUT_S = 240.0

_reason = unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):  # one host failed: give the others a moment to fail too
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            return [p.poll() for p in procs]
        time.sleep(0.2)
    return [p.poll() for p in procs]


def test_ring_across_three_hosts(tmp_path, tiny_dirs, token_jsonl):
    out = tmp_path / "out"
    model = tiny_dirs["llama"]
    blocks = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    sets = [f"run.out_dir={out}", f"model.path={model}", f"data.train={token_jsonl}", f"data.eval={token_jsonl}",
            "data.seq_len=16", "data.batch_size=4", "pipeline.mode=ring", f"run.steps={STEPS}", "run.eval_batches=1",
            # the default config unfreezes 8 of SmolLM2's 30 blocks; the tiny model has 4: 2, then all 4
            "unfreeze.initial=2", "unfreeze.every=1", "unfreeze.increment=2"]
    args = [a for s in sets for a in ("--set", s)]
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME")}
    logs = []
    with NetnsCluster(NODES, rate="100mbit") as cluster:
        env = {**base_env, "NNODES": str(NODES), "RDZV_ENDPOINT": f"{cluster.hostnames[0]}:29400",
               "RDZV_ID": f"multihost-{cluster.tag}", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "CONFIG": "configs/ring_smollm2.yaml"}
        procs = []
        for i in range(NODES):
            log = open(tmp_path / f"{cluster.hostnames[i]}.log", "w+")
            logs.append(log)
            procs.append(cluster.popen(i, [str(REPO / "launch" / "ring_multinode.sh"), *args], cwd=REPO, env=env,
                                       stdout=log, stderr=subprocess.STDOUT))
        codes = _wait_all(procs, TIMEOUT_S)
        port_bytes = cluster.port_bytes()
        notes = list(cluster.notes)
    # the cluster is gone (every process killed) before anything is asserted
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    report = "\n".join(f"--- {cluster.hostnames[i]} exit {codes[i]} ---\n{texts[i][-4000:]}" for i in range(NODES))
    assert codes == [0] * NODES, report + ("\n" + "\n".join(notes) if notes else "")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == NODES and summary["steps"] == STEPS
    ranks = sorted(summary["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == list(range(NODES))
    # the ranks' blocks [lo, hi) are consecutive and cover the model
    edges = [tuple(r["blocks"]) for r in ranks]
    assert edges[0][0] == 0 and edges[-1][1] == blocks, edges
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:])), edges
    for r in ranks:
        assert r["bytes_sent"] > 0 and r["bytes_recv"] > 0, r
    assert sum(r["bytes_sent"] for r in ranks) == sum(r["bytes_recv"] for r in ranks)
    # and those bytes went over the links: every host used its link, and together they sent at least the payload
    assert all(rx > 0 and tx > 0 for rx, tx in port_bytes), port_bytes
    assert sum(rx for rx, _ in port_bytes) >= sum(r["bytes_sent"] for r in ranks), (port_bytes, ranks)
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == STEPS
    assert [json.loads(m)["step"] for m in metrics] == list(range(STEPS))
    assert [json.loads(m)["trainable_blocks"] for m in metrics] == [2, 4]
