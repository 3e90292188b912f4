"""Checkpoints: a run stopped after a checkpoint and resumed ends bit for bit where an uninterrupted run ends;
incomplete checkpoints are never read; a resume that does not fit the launch is refused before it starts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ringada import checkpoint
from ringada.config import ConfigError, load
from ringada.launch import train as run_single


def _raw(out, model_dir, data, steps, mode="single", unfreeze=None, **run):
    return {
        "run": {"out_dir": str(out), "seed": 5, "steps": steps, "eval_batches": 1, **run},
        "model": {"path": str(model_dir)},
        "adapter": {"r": 4, "dropout": 0.1},
        "data": {"train": str(data), "eval": str(data), "seq_len": 16, "batch_size": 4, "micro_batches": 2},
        "optim": {"lr": 0.01, "weight_decay": 0.1},
        "pipeline": {"mode": mode, **({"partition": [1, 3]} if mode == "ring" else {})},
        # the frontier moves and plateau state is kept across the resume
        "unfreeze": unfreeze or {"initial": 1, "every": 2, "increment": 1},
    }


def _cfg(raw):
    return load(None, [f"{section}.{k}={json.dumps(v)}" for section, keys in raw.items() for k, v in keys.items()])


def _same_run(a, b):
    final_a, final_b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert json.loads((a / "summary.json").read_text())["eval_loss"] == \
        json.loads((b / "summary.json").read_text())["eval_loss"]


@pytest.mark.parametrize("unfreeze", [None, {"initial": 1, "every": 1, "by": "plateau", "min_delta": 0.5}])
def test_single_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, tiny_dirs, token_jsonl,
                                                                           unfreeze):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_single(_cfg(_raw(full, tiny_dirs["llama"], token_jsonl, 6, unfreeze=unfreeze)))
    # an earlier run's checkpoint in the same directory: resume=false starts over and deletes it
    checkpoint.save(cut, 5, {"x": torch.zeros(1)}, {"family": "pipeline", "config": {}})
    # the interrupted run: checkpoints after steps 2 and 4, then stops
    run_single(_cfg(_raw(cut, tiny_dirs["llama"], token_jsonl, 4, unfreeze=unfreeze, checkpoint_every=2,
                         resume=False)))
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    manifest = json.loads((cut / "checkpoints" / "step_00000004" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["world_size"] == 1 and manifest["family"] == "pipeline"
    # a checkpoint whose manifest never got written (a crash mid-way) is not a resume point
    (cut / "checkpoints" / "step_00000005").mkdir()
    (cut / "checkpoints" / "step_00000005" / "state.safetensors").write_bytes(b"half")
    # the same command line continues (run.resume: auto, the default)
    summary = run_single(_cfg(_raw(cut, tiny_dirs["llama"], token_jsonl, 6, unfreeze=unfreeze, checkpoint_every=2)))
    assert summary["resumed_from_step"] == 4
    _same_run(full, cut)
    # only the newest checkpoints stay, and no torn one
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    if unfreeze:  # the plateau counter moved the frontier, before and after the resume alike
        frontiers = [json.loads(line)["frontier"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
        assert frontiers == [json.loads(line)["frontier"]
                             for line in (full / "metrics.jsonl").read_text().splitlines()]
        assert len(set(frontiers)) > 1


def test_ring_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(pool2, tmp_path, tiny_dirs, token_jsonl):
    full, cut = tmp_path / "full", tmp_path / "cut"
    pool2.run(_raw(full, tiny_dirs["llama"], token_jsonl, 6, mode="ring"))
    pool2.run(_raw(cut, tiny_dirs["llama"], token_jsonl, 3, mode="ring", checkpoint_every=3))
    # one file, written by the initiator: no other box needs the directory
    assert sorted(p.name for p in (cut / "checkpoints" / "step_00000003").iterdir()) == \
        ["manifest.json", "state.safetensors"]
    pool2.run(_raw(cut, tiny_dirs["llama"], token_jsonl, 6, mode="ring"))
    assert json.loads((cut / "summary.json").read_text())["resumed_from_step"] == 3
    _same_run(full, cut)


def test_a_ring_checkpoint_continues_on_a_smaller_or_larger_ring(pool4, tmp_path, tiny_dirs, token_jsonl):
    """Keyed by block, a checkpoint of a 2-rank ring continues on 4 ranks, and in one process; the
    continuations agree (and so equal a single process resumed from the same checkpoint)."""
    from ringada.launch import train as run_single
    from tests.reference import assert_adapters_equal

    first = tmp_path / "first"
    run_single(_cfg(_raw(first, tiny_dirs["llama"], token_jsonl, 3, checkpoint_every=3)))
    outs = {}
    for name, mode, part in (("single", "single", None), ("ring4", "ring", [1, 1, 1, 1])):
        out = tmp_path / name
        shutil.copytree(first, out)
        raw = _raw(out, tiny_dirs["llama"], token_jsonl, 6, mode=mode)
        if part:
            raw["pipeline"]["partition"] = part
        if mode == "single":
            summary = run_single(_cfg(raw))
        else:
            pool4.run(raw)
            summary = json.loads((out / "summary.json").read_text())
        assert summary["resumed_from_step"] == 3 and summary["world_size"] == (4 if part else 1)
        outs[name] = out
    got, want = (load_file(outs[n] / "adapter" / "adapter_model.safetensors") for n in ("ring4", "single"))
    assert_adapters_equal(got, want)
    losses = [[json.loads(line)["loss"] for line in (outs[n] / "metrics.jsonl").read_text().splitlines()]
              for n in ("ring4", "single")]
    assert losses[0][:3] == losses[1][:3]  # the steps before the checkpoint are kept as they were
    assert losses[0][3:] == pytest.approx(losses[1][3:], rel=1e-5)


def test_resume_is_refused_when_nothing_fits(tmp_path):
    cfg = load(None, [f"run.out_dir={tmp_path}", "run.steps=4", "run.resume=true"])
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        checkpoint.resume_point(cfg)
    auto = load(None, [f"run.out_dir={tmp_path}", "run.steps=4"])
    assert auto.run.resume == "auto" and checkpoint.resume_point(auto) is None  # nothing yet: a fresh start
    manifest = {"family": "pipeline", "world_size": 2, "config": checkpoint.config_fingerprint(cfg)}
    checkpoint.save(tmp_path, 2, {"x": torch.zeros(1)}, manifest)
    assert checkpoint.resume_point(cfg)[1]["step"] == 2
    assert checkpoint.resume_point(auto)[1]["step"] == 2
    # run.steps may grow, the partition and the world size may change; the learning rate schedule may not
    longer = load(None, [f"run.out_dir={tmp_path}", "run.steps=9", "pipeline.mode=ring", "pipeline.partition=[1, 3]"])
    assert checkpoint.resume_point(longer)[1]["step"] == 2
    other = load(None, [f"run.out_dir={tmp_path}", "run.steps=4", "optim.weight_decay=0.5"])
    with pytest.raises(ConfigError, match=r"written with optim.weight_decay=0.0; this launch has "
                                          r"optim.weight_decay=0.5.*run.resume=false"):
        checkpoint.resume_point(other)
    star = load(None, [f"run.out_dir={tmp_path}", "run.steps=4", "pipeline.mode=sfl", "star.rounds=4"])
    with pytest.raises(ConfigError, match="written by a pipeline run; pipeline.mode='sfl' cannot continue it"):
        checkpoint.resume_point(star)
    shorter = load(None, [f"run.out_dir={tmp_path}", "run.steps=1"])
    with pytest.raises(ConfigError, match="after step 2, beyond run.steps=1"):
        checkpoint.resume_point(shorter)
    (tmp_path / "checkpoints" / "step_00000002" / "state.safetensors").write_bytes(b"torn")
    with pytest.raises(ConfigError, match="state.safetensors cannot be read"):
        checkpoint.resume_point(cfg)
    assert not list(tmp_path.rglob("*.tmp*"))  # files are renamed into place
    fresh = load(None, [f"run.out_dir={tmp_path}", "run.steps=4", "run.resume=false"])
    assert checkpoint.resume_point(fresh) is None


def test_checkpoints_refuse_non_finite_tensors(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        checkpoint.save(tmp_path, 1, {"x": torch.tensor([float("nan")])}, {})
    assert checkpoint.latest(tmp_path) is None


def test_a_newer_checkpoint_on_a_box_that_is_not_rank_0_is_not_ignored(pool2, tmp_path, tiny_dirs, token_jsonl):
    """After a restart that moved rank 0 to another box, the box holding the newest checkpoint says so instead
    of the run silently starting over. (Two "boxes": each rank gets its own out_dir.)"""
    import os
    import subprocess
    import sys

    from tests.ranks import REPO, free_port

    raw = _raw(tmp_path / "box1", tiny_dirs["llama"], token_jsonl, 4, mode="ring", checkpoint_every=2)
    pool2.run(raw)  # box1 held rank 0 then
    sets = [f"{section}.{k}={json.dumps(v)}" for section, keys in raw.items() for k, v in keys.items()
            if (section, k) != ("run", "out_dir")]
    port, procs = free_port(), []
    for rank, box in ((0, "box0"), (1, "box1")):  # now box0, with no checkpoint, is rank 0
        args = [a for s in sets + [f"run.out_dir={tmp_path / box}"] for a in ("--set", s)]
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TOKENIZERS_PARALLELISM": "false"}
        procs.append(subprocess.Popen([sys.executable, "-m", "ringada", "train", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 2 and "another box holds a checkpoint after step 4" in out, out[-2000:]
    assert not (tmp_path / "box0" / "adapter").exists()


def test_a_refused_resume_stops_every_rank_with_the_reason(pool2, tmp_path, tiny_dirs, token_jsonl):
    """The initiator alone holds checkpoints; when it refuses to continue, every rank stops with a config error
    after the first exchange, none waits."""
    raw = _raw(tmp_path / "run", tiny_dirs["llama"], token_jsonl, 4, mode="ring", resume=True)
    with pytest.raises(RuntimeError) as err:
        pool2.run(raw)
    text = str(err.value)
    assert "--- rank 0" in text and "holds no complete checkpoint" in text
    assert "--- rank 1" in text and "rank 0 refused to start" in text
