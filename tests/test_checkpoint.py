"""Checkpoints: a run stopped after a checkpoint and resumed ends bit for bit where an uninterrupted run ends;
incomplete checkpoints are never read; a resume that does not fit the launch is refused before it starts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ringada import checkpoint
from ringada.config import ConfigError, load
from ringada.runtime import train as run_single


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
    # an earlier run's checkpoint in the same directory is cleared by the next fresh run
    checkpoint.write_rank(cut, 5, 0, {"adapter/x": torch.zeros(1)})
    checkpoint.write_manifest(cut, 5, {"step": 5, "world_size": 1, "partition": [4]})
    # the interrupted run: checkpoints after steps 2 and 4, then stops
    run_single(_cfg(_raw(cut, tiny_dirs["llama"], token_jsonl, 4, unfreeze=unfreeze, checkpoint_every=2)))
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    manifest = json.loads((cut / "checkpoints" / "step_00000004" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["world_size"] == 1
    # a checkpoint whose manifest never got written (a crash mid-way) is not a resume point
    (cut / "checkpoints" / "step_00000005").mkdir()
    (cut / "checkpoints" / "step_00000005" / "rank0.safetensors").write_bytes(b"half")
    summary = run_single(_cfg(_raw(cut, tiny_dirs["llama"], token_jsonl, 6, unfreeze=unfreeze, resume=True)))
    assert summary["resumed_from_step"] == 4
    _same_run(full, cut)
    if unfreeze:  # the plateau counter moved the frontier, before and after the resume alike
        frontiers = [json.loads(line)["frontier"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
        assert frontiers == [json.loads(line)["frontier"]
                             for line in (full / "metrics.jsonl").read_text().splitlines()]
        assert len(set(frontiers)) > 1


def test_ring_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(pool2, tmp_path, tiny_dirs, token_jsonl):
    full, cut = tmp_path / "full", tmp_path / "cut"
    pool2.run(_raw(full, tiny_dirs["llama"], token_jsonl, 6, mode="ring"))
    pool2.run(_raw(cut, tiny_dirs["llama"], token_jsonl, 3, mode="ring", checkpoint_every=3))
    assert sorted(p.name for p in (cut / "checkpoints" / "step_00000003").iterdir()) == \
        ["manifest.json", "rank0.safetensors", "rank1.safetensors"]
    pool2.run(_raw(cut, tiny_dirs["llama"], token_jsonl, 6, mode="ring", resume=True))
    assert json.loads((cut / "summary.json").read_text())["resumed_from_step"] == 3
    _same_run(full, cut)


def test_resume_is_refused_when_nothing_fits(tmp_path):
    cfg = load(None, [f"run.out_dir={tmp_path}", "run.steps=4", "run.resume=true"])
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        checkpoint.find_resume_point(cfg, 1, [4])
    for r in range(2):
        checkpoint.write_rank(tmp_path, 2, r, {"adapter/x": torch.zeros(1)})
    manifest = {"step": 2, "world_size": 2, "partition": [1, 3], "config": checkpoint.config_fingerprint(cfg)}
    checkpoint.write_manifest(tmp_path, 2, manifest)
    with pytest.raises(ConfigError, match=r"written by 2 ranks with partition \[1, 3\]; this launch has 4 ranks"):
        checkpoint.find_resume_point(cfg, 4, [1, 1, 1, 1])
    assert checkpoint.find_resume_point(cfg, 2, [1, 3])[1]["step"] == 2
    # run.steps may grow; the learning rate may not change
    longer = load(None, [f"run.out_dir={tmp_path}", "run.steps=9", "run.resume=true"])
    assert checkpoint.find_resume_point(longer, 2, [1, 3])[1]["step"] == 2
    other = load(None, [f"run.out_dir={tmp_path}", "run.steps=4", "run.resume=true", "optim.lr=0.5"])
    with pytest.raises(ConfigError, match=r"written with optim.lr=0.0\d+; this launch has optim.lr=0.5"):
        checkpoint.find_resume_point(other, 2, [1, 3])
    shorter = load(None, [f"run.out_dir={tmp_path}", "run.steps=1", "run.resume=true"])
    with pytest.raises(ConfigError, match="after step 2, beyond run.steps=1"):
        checkpoint.find_resume_point(shorter, 2, [1, 3])
    (tmp_path / "checkpoints" / "step_00000002" / "rank1.safetensors").write_bytes(b"torn")
    with pytest.raises(ConfigError, match="rank1.safetensors cannot be read"):
        checkpoint.find_resume_point(cfg, 2, [1, 3])
    assert not list(tmp_path.rglob("*.tmp*"))  # files are renamed into place
