"""Failures as normal events (DESIGN: failure semantics), with real processes killed by the ids we started.

- a ring worker killed under ``torchrun --max-restarts 1`` costs the steps since the last checkpoint, and the run
  ends bit for bit where an uninterrupted one ends;
- a silent peer becomes an error naming this rank, the peer, the step and the action within run.timeout_s;
- a star device killed mid-round (its torchrun agent and worker, one agent per box) is a dropout: the run ends
  with exit 0 and every round's global adapter equals a FedAvg of the survivors computed here with plain
  transformers + peft;
- a whole star killed and started again continues from its last round, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.ranks import REPO, free_port
from tests.reference import assert_adapters_equal, load_reference

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _sets(out, model_dir, data, **keys) -> list[str]:
    base = {"run.out_dir": out, "model.path": model_dir, "data.train": data, "data.eval": "null",
            "data.seq_len": 16, "data.batch_size": 4, "run.log_every": 1000, "optim.lr": 0.01, **keys}
    return [a for k, v in base.items() for a in ("--set", f"{k}={v}")]


def _as_config(args: list[str]) -> dict:
    """The nested config that ``--set`` arguments describe (for the started ranks of tests/ranks.py)."""
    from ringada.config import parse_override

    raw: dict = {}
    for text in args[1::2]:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return raw


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            for child in _children(p.pid):
                os.kill(child, signal.SIGKILL)
            p.kill()
            p.wait(timeout=30)


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def _losses(out) -> list:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------- ring


def _torchrun(nproc: int, args: list[str], *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *extra, "-m", "ringada", "train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_ring_worker_killed_under_torchrun_restarts_and_ends_bit_identical(tmp_path, tiny_dirs, token_jsonl):
    keys = {"pipeline.mode": "ring", "run.steps": 300, "run.checkpoint_every": 10, "data.micro_batches": 2}
    full, cut = tmp_path / "full", tmp_path / "cut"
    plain = _torchrun(3, _sets(full, tiny_dirs["llama"], token_jsonl, **keys))
    killed = _torchrun(3, _sets(cut, tiny_dirs["llama"], token_jsonl, **keys), "--max-restarts=1")
    try:
        _wait_for(lambda: _lines(cut / "metrics.jsonl") >= 25, 120, "25 steps of the ring")
        worker = next(pid for pid in _children(killed.pid) if _env_of(pid).get("LOCAL_RANK") == "1")
        at = _lines(cut / "metrics.jsonl")
        os.kill(worker, signal.SIGKILL)  # the middle rank of the ring, mid-run
        log = killed.communicate(timeout=240)[0]
        assert killed.returncode == 0, log[-3000:]
        assert plain.communicate(timeout=240)[0] is not None and plain.returncode == 0
    finally:
        _kill_all([plain, killed])
    summary = json.loads((cut / "summary.json").read_text())
    resumed = summary["resumed_from_step"]
    assert resumed % 10 == 0 and at - 10 <= resumed + 10 and resumed <= at + 10, (resumed, at)
    # a survivor that noticed the loss before torchrun stopped it named a peer, the step and the action (torchrun
    # may stop the survivors first: whether they get to print is a race with its agent)
    errors = [line for line in log.splitlines() if "ringada: error:" in line]
    assert all(re.search(r"with (rank \d|the other ranks \(a collective[^)]*\)) at step \d+ failed", e)
               for e in errors), errors
    want, got = _adapter(full), _adapter(cut)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert _losses(cut) == _losses(full) and len(_losses(cut)) == 300


def test_a_silent_peer_is_an_error_naming_rank_peer_step_and_action(tmp_path, tiny_dirs, token_jsonl):
    """A rank that stops answering (SIGSTOP: its sockets stay open) is noticed within run.timeout_s."""
    out, world, port = tmp_path / "out", 3, free_port()
    args = _sets(out, tiny_dirs["llama"], token_jsonl, **{"pipeline.mode": "ring", "run.steps": 100000,
                                                          "run.timeout_s": 4})
    procs = [subprocess.Popen([sys.executable, "-m", "ringada", "train", *args], cwd=REPO,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
               for r in range(world)]
    try:
        _wait_for(lambda: _lines(out / "metrics.jsonl") >= 5, 120, "5 steps of the ring")
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        logs = {r: procs[r].communicate(timeout=60)[0] for r in (0, 2)}
        noticed = time.monotonic() - stopped
    finally:
        _kill_all(procs)
    assert noticed < 4 * 3, noticed
    timeout, gone = "failed (no answer within run.timeout_s=4 s", "failed (the peer's process or box is gone)"
    for r in (0, 2):
        assert procs[r].returncode == 1, logs[r][-2000:]
        assert f"ringada: error: rank {r}: " in logs[r] and (timeout in logs[r] or gone in logs[r]), logs[r][-2000:]
    # the first survivor to notice can only have run out of time (rank 1's sockets stay open); the other may see
    # that one exit first and then names it as gone, which is just as true
    assert timeout in logs[0] or timeout in logs[2], (logs[0][-2000:], logs[2][-2000:])
    # a rank waiting on rank 1 point to point names it; one waiting in the step's all_reduce cannot know who
    both = logs[0] + logs[2]
    assert "with rank 1 at step" in both or "with the other ranks (a collective" in both


# ------------------------------------------------------------------------------------------------------- star


def _star_keys(rounds: int, local_steps: int, **more) -> dict:
    return {"pipeline.mode": "sfl", "star.device_blocks": "[1,2,3]", "star.rounds": rounds,
            "star.local_steps": local_steps, "run.steps": rounds * local_steps, "adapter.r": 4, **more}


def _agents(nnodes: int, args: list[str], logs: Path) -> list[subprocess.Popen]:
    """One torchrun agent per box (``--nnodes N --node-rank i`` on loopback: node 0 is the server)."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
                              f"--node-rank={i}", "--nproc-per-node=1", "--master-addr=127.0.0.1",
                              f"--master-port={port}", "-m", "ringada", "train", *args], cwd=REPO,
                             env={**ENV, "LOGLEVEL": "INFO"}, stdout=open(logs / f"node{i}.log", "w"),
                             stderr=subprocess.STDOUT, start_new_session=True) for i in range(nnodes)]


class _Device:
    """A device in plain transformers + peft: the whole model's LoRA trained on the device's shard with one
    AdamW kept across rounds, restarted every round from the run's saved global adapter."""

    def __init__(self, model_dir, init_dir, shard, seed, rank, lr):
        self.model, self.params = load_reference(str(model_dir), str(init_dir))
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=0.0)
        self.shard, self.seed, self.rank, self.steps = shard, seed, rank, 0

    def round(self, start: dict, local_steps: int) -> dict:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(start[k])
        for _ in range(local_steps):
            _, b = self.shard.batch_at(self.steps, 4, True, self.seed + self.rank)
            logits = self.model(input_ids=b.input_ids).logits[:, :-1]
            labels = b.labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     reduction="sum") / labels.numel()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.steps += 1
        return {k: p.detach().clone() for k, p in self.params.items()}


def test_a_star_device_killed_mid_round_is_a_dropout(tmp_path, tiny_dirs, token_jsonl):
    from ringada.config import load
    from ringada.data import load_dataset
    from ringada.federated.shards import shard_rows

    out, rounds, local = tmp_path / "out", 40, 3
    args = _sets(out, tiny_dirs["llama"], token_jsonl, **_star_keys(rounds, local))
    agents = _agents(4, args, tmp_path / "logs")
    try:
        _wait_for(lambda: _lines(out / "metrics.jsonl") >= 4 * local, 120, "4 rounds of the star")
        worker = _children(agents[3].pid)
        os.kill(agents[3].pid, signal.SIGKILL)  # device 3's box: its agent and its worker (a session of its own)
        for pid in worker:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _wait_for(lambda: (out / "summary.json").exists(), 120, "the server's summary")
        finished = time.monotonic() - killed
        # every survivor's worker ends with exit 0 (its agent then waits in torchrun's exit barrier for the
        # agent that is gone)
        _wait_for(lambda: all("worker group successfully finished" in (tmp_path / "logs" / f"node{i}.log")
                              .read_text() for i in range(3)), 60, "the survivors' workers to succeed")
    finally:
        _kill_all(agents)
    summary = json.loads((out / "summary.json").read_text())
    lost = summary["lost_devices"]
    assert list(lost) == ["3"] and "with rank 3 at step" in lost["3"]["error"], lost
    t_lost = lost["3"]["round"]
    log = summary["rounds_log"]
    assert len(log) == rounds and finished < 60
    assert all(r["round_finished"] == [1, 2, 3] for r in log[:t_lost])
    assert all(r["round_finished"] == [1, 2] for r in log[t_lost:]) and "3" in log[t_lost]["round_lost"]
    assert summary["ranks"][3]["lost"]["round"] == t_lost and summary["ranks"][1]["bytes_sent"] > 0

    # every round's global adapter, recomputed from the previous one with plain peft on the survivors' data
    cfg = load(None, [a for a in args if a != "--set"])
    ds = load_dataset(str(token_jsonl), "train", task="causal_lm", seq_len=16)
    rows = shard_rows(ds.groups, 3, "iid", 0.5, cfg.run.seed, 4)
    devices = {u: _Device(tiny_dirs["llama"], out / "adapter_init", ds.subset(rows[u - 1], f"d{u}"), cfg.run.seed,
                          u, 0.01) for u in (1, 2, 3)}
    sizes = {u: float(len(rows[u - 1])) for u in devices}
    start = load_file(out / "adapter_init" / "adapter_model.safetensors")
    for t, info in enumerate(log[:t_lost + 3]):
        views = {u: devices[u].round(start, local) for u in info["round_finished"]}
        total = sum(sizes[u] for u in views)
        want = {k: sum(sizes[u] / total * views[u][k] for u in views) for k in start}
        got = load_file(out / "rounds" / f"round_{t:04d}" / "adapter_model.safetensors")
        assert_adapters_equal(got, want)
        start = got


def test_a_whole_star_restarts_from_its_last_round(pool4, tmp_path, tiny_dirs, token_jsonl):
    """Every process of the star killed at once (the server's box rebooted); the same command continues from
    the last checkpointed round and ends bit for bit as the uninterrupted run, selection state and all."""
    keys = _star_keys(24, 2, **{"star.selection": "random", "star.devices_per_round": 2, "data.eval": str(token_jsonl),
                                "run.eval_batches": 1, "run.eval_every": 6})
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = _sets(cut, tiny_dirs["llama"], token_jsonl, **keys)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "ringada", "train", *args], cwd=REPO,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "4",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for r in range(4)]
    try:
        _wait_for(lambda: _lines(cut / "metrics.jsonl") >= 2 * 5, 120, "5 rounds of the star")
    finally:
        _kill_all(procs)
    assert not (cut / "summary.json").exists()
    for out in (cut, full):  # the same command line again: run.resume=auto continues; and an uninterrupted run
        pool4.run(_as_config(_sets(out, tiny_dirs["llama"], token_jsonl, **keys)))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 2 * 4 and summary["resumed_from_step"] % 2 == 0
    want, got = _adapter(full), _adapter(cut)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _losses(cut) == _losses(full)
    s_full = json.loads((full / "summary.json").read_text())
    assert summary["eval_loss"] == s_full["eval_loss"]
    assert [r["round_selected"] for r in summary["rounds_log"]] == [r["round_selected"] for r in s_full["rounds_log"]]


# ------------------------------------------------------------------------------------------------- non-finite


def _diverging(out, model_dir, data, mode, on_nonfinite, **more) -> dict:
    """A learning rate so large that the second step's gradient (or loss) is no longer finite."""
    raw = _as_config(_sets(out, model_dir, data, **{"optim.lr": 1e10, "optim.on_nonfinite": on_nonfinite,
                                                    "run.steps": 4, "data.eval": str(data), "run.eval_batches": 1,
                                                    "pipeline.mode": mode, **more}))
    return raw


def _all_finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tensors.values())


def test_nonfinite_stop_ends_before_any_update_with_a_checkpoint(tmp_path, tiny_dirs, token_jsonl):
    from ringada import checkpoint
    from ringada.config import from_dict
    from ringada.driver import NonFiniteError
    from ringada.launch import train

    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"non-finite .* at step 1 .*rank 0.*optim.on_nonfinite=stop"):
        train(from_dict(_diverging(out, tiny_dirs["llama"], token_jsonl, "single", "stop")))
    found = checkpoint.latest(out)
    assert found is not None and found[1]["step"] == 1  # the state after the last finite step
    saved = checkpoint.load_tensors(found[0])
    final = _adapter(out)
    assert _all_finite(final) and all(torch.equal(final[k], saved[k]) for k in final)
    summary = json.loads((out / "summary.json").read_text())
    assert "optim.on_nonfinite=stop" in summary["stopped"] and summary["steps"] == 4
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1] and metrics[1]["loss"] is None and metrics[1]["skipped"]
    assert "NaN" not in (out / "metrics.jsonl").read_text() + (out / "summary.json").read_text()


@pytest.mark.parametrize("mode", ["ring", "sfl"])
def test_nonfinite_stop_stops_every_rank_after_the_same_step(pool2, tmp_path, tiny_dirs, token_jsonl, mode):
    out = tmp_path / "out"
    more = {"star.device_blocks": "[2]", "star.rounds": 2, "star.local_steps": 2} if mode == "sfl" else \
        {"data.micro_batches": 2}
    raw = _diverging(out, tiny_dirs["llama"], token_jsonl, mode, "stop", **more)
    with pytest.raises(RuntimeError) as err:
        pool2.run(raw)
    text = str(err.value)
    assert text.count("NonFiniteError") >= 2 and "--- rank 0" in text and "--- rank 1" in text
    # ring: the state before step 1; star: before the round with the non-finite step (its first)
    step = 1 if mode == "ring" else 0
    assert "at step 1" in text and (out / "checkpoints" / f"step_{step:08d}" / "manifest.json").exists()
    assert _all_finite(_adapter(out))


@pytest.mark.parametrize("mode", ["single", "sfl"])
def test_nonfinite_skip_drops_the_updates_and_counts_them(pool2, tmp_path, tiny_dirs, token_jsonl, mode):
    from ringada.config import from_dict
    from ringada.launch import train

    out = tmp_path / "out"
    star = {"star.device_blocks": "[2]", "star.rounds": 2, "star.local_steps": 2} if mode == "sfl" else {}
    raw = _diverging(out, tiny_dirs["llama"], token_jsonl, mode, "skip", **star)
    if mode == "single":
        train(from_dict(raw))
    else:
        pool2.run(raw)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] and summary["skipped_steps"][0] >= 1 and "stopped" not in summary
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert all(m["loss"] is None for m in metrics if m.get("skipped"))
    assert _all_finite(_adapter(out))


def test_a_silent_star_device_is_dropped_and_the_others_go_on(tmp_path, tiny_dirs, token_jsonl):
    """A device that stops answering (SIGSTOP) is dropped after run.timeout_s; the devices that idle meanwhile
    wait far longer for the server, so the run ends with exit 0 without it."""
    out, port = tmp_path / "out", free_port()
    args = _sets(out, tiny_dirs["llama"], token_jsonl, **_star_keys(30, 2, **{"run.timeout_s": 3}))
    procs = [subprocess.Popen([sys.executable, "-m", "ringada", "train", *args], cwd=REPO,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "4",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
               for r in range(4)]
    try:
        _wait_for(lambda: _lines(out / "metrics.jsonl") >= 2 * 3, 120, "3 rounds of the star")
        os.kill(procs[2].pid, signal.SIGSTOP)
        logs = {r: procs[r].communicate(timeout=120)[0] for r in (0, 1, 3)}
    finally:
        _kill_all(procs)
    assert all(procs[r].returncode == 0 for r in (0, 1, 3)), logs[0][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    lost = summary["lost_devices"]
    assert list(lost) == ["2"] and "no answer within run.timeout_s=3 s" in lost["2"]["error"], lost
    assert summary["rounds_log"][-1]["round_finished"] == [1, 3] and len(summary["rounds_log"]) == 30
