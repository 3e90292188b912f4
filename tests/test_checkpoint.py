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


def _raw(out, model_dir, data, steps, mode="single", **run):
    return {
        "run": {"out_dir": str(out), "seed": 5, "steps": steps, "eval_batches": 1, **run},
        "model": {"path": str(model_dir)},
        "adapter": {"r": 4, "dropout": 0.1},
        "data": {"train": str(data), "eval": str(data), "seq_len": 16, "batch_size": 4, "micro_batches": 2},
        "optim": {"lr": 0.01, "weight_decay": 0.1},
        "pipeline": {"mode": mode, **({"partition": [1, 3]} if mode == "ring" else {})},
        # the frontier moves and plateau state is kept across the resume
        "unfreeze": {"initial": 1, "every": 2, "increment": 1},
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


def test_single_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, tiny_dirs, token_jsonl):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_single(_cfg(_raw(full, tiny_dirs["llama"], token_jsonl, 6)))
    # the interrupted run: checkpoints after steps 2 and 4, then stops
    run_single(_cfg(_raw(cut, tiny_dirs["llama"], token_jsonl, 4, checkpoint_every=2)))
    manifest = json.loads((cut / "checkpoints" / "step_000004" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["world_size"] == 1
    # a checkpoint whose manifest never got written (a crash mid-way) is not a resume point
    (cut / "checkpoints" / "step_000005").mkdir()
    (cut / "checkpoints" / "step_000005" / "rank0.safetensors").write_bytes(b"half")
    assert run_single(_cfg(_raw(cut, tiny_dirs["llama"], token_jsonl, 6, resume=True)))["resumed_from_step"] == 4
    _same_run(full, cut)


def test_ring_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(pool2, tmp_path, tiny_dirs, token_jsonl):
    full, cut = tmp_path / "full", tmp_path / "cut"
    pool2.run(_raw(full, tiny_dirs["llama"], token_jsonl, 6, mode="ring"))
    pool2.run(_raw(cut, tiny_dirs["llama"], token_jsonl, 3, mode="ring", checkpoint_every=3))
    assert sorted(p.name for p in (cut / "checkpoints" / "step_000003").iterdir()) == \
        ["manifest.json", "rank0.safetensors", "rank1.safetensors"]
    pool2.run(_raw(cut, tiny_dirs["llama"], token_jsonl, 6, mode="ring", resume=True))
    assert json.loads((cut / "summary.json").read_text())["resumed_from_step"] == 3
    _same_run(full, cut)


def test_resume_is_refused_when_nothing_fits(tmp_path):
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        checkpoint.find_resume_point(tmp_path, 1, [4])
    checkpoint.write_rank(tmp_path, 2, 0, {"adapter/x": torch.zeros(1)})
    checkpoint.write_manifest(tmp_path, 2, {"step": 2, "world_size": 2, "partition": [1, 3]})
    with pytest.raises(ConfigError, match=r"written by 2 ranks with partition \[1, 3\]; this launch has 4 ranks"):
        checkpoint.find_resume_point(tmp_path, 4, [1, 1, 1, 1])
    assert checkpoint.find_resume_point(tmp_path, 2, [1, 3])[1]["step"] == 2
    assert not list(tmp_path.rglob("*.tmp*"))  # files are renamed into place
