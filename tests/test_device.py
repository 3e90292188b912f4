"""Where ranks compute and what carries their messages: run.device / run.backend / run.dtype, on the CPU.

(CUDA runs are in tests/test_cuda.py, which skips without a GPU; scripts/gpu_check.sh runs it on one.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ringada.config import ConfigError, from_dict, load
from ringada.launch import placement
from tests.reference import assert_adapters_equal


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this box has ``n`` GPUs (placement only asks torch how many)."""
    def set_gpus(n: int, local_rank: int = 0, local_world: int = 1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    return set_gpus


def test_auto_computes_on_the_gpu_when_there_is_one_and_shares_it_through_gloo(gpus):
    gpus(0)
    assert placement(load(None, [])) == (torch.device("cpu"), "gloo")
    gpus(2, local_rank=3, local_world=4)
    assert placement(load(None, ["pipeline.mode=ring"])) == (torch.device("cuda:1"), "gloo")
    assert placement(load(None, ["run.device=cpu"])) == (torch.device("cpu"), "gloo")
    gpus(4, local_rank=3, local_world=4)
    assert placement(load(None, ["pipeline.mode=ring", "run.backend=nccl"])) == (torch.device("cuda:3"), "nccl")


def test_placement_mistakes_name_the_key_and_the_fix(gpus):
    gpus(0)
    with pytest.raises(ConfigError, match=r"run.device: got 'cuda' but torch sees no GPU.*use auto or cpu"):
        placement(load(None, ["run.device=cuda"]))
    gpus(1, local_rank=1, local_world=4)
    with pytest.raises(ConfigError, match=r"run.backend: got 'nccl' with 4 ranks on this box and 1 GPU\(s\).*gloo"):
        placement(load(None, ["pipeline.mode=ring", "run.backend=nccl"]))
    for sets, words in ((["run.backend=nccl", "run.device=cpu"], "run.device='cpu'"),
                        (["run.backend=nccl", "pipeline.mode=sfl", "run.steps=1"], "star links use gloo"),
                        (["run.dtype=bfloat16", "model.task=classification", "model.num_labels=2",
                          "data.train=polarity", "data.eval=polarity"], "classification head trains in float32"),
                        (["run.dtype=float16"], "'bfloat16'")):
        with pytest.raises(ConfigError, match=words):
            load(None, sets)


def _raw(out, model_dir, data, mode, dtype, **pipe):
    return {"run": {"out_dir": str(out), "seed": 3, "steps": 3, "eval_batches": 1, "dtype": dtype},
            "model": {"path": str(model_dir)}, "adapter": {"r": 4},
            "data": {"train": str(data), "eval": str(data), "seq_len": 16, "batch_size": 4, "micro_batches": 2},
            "optim": {"lr": 0.01}, "pipeline": {"mode": mode, **pipe}}


def test_a_bfloat16_base_keeps_fp32_adapters_and_a_ring_learns_what_one_process_learns(pool2, tmp_path,
                                                                                        tiny_dirs, token_jsonl):
    from ringada.launch import train

    runs = {}
    for name, mode, dtype in (("single16", "single", "bfloat16"), ("single32", "single", "float32"),
                              ("ring16", "ring", "bfloat16")):
        raw = _raw(tmp_path / name, tiny_dirs["llama"], token_jsonl, mode, dtype)
        if mode == "single":
            train(from_dict(raw))
        else:
            pool2.run(raw)
        runs[name] = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"),
                      json.loads((tmp_path / name / "summary.json").read_text()))
    assert all(v.dtype == torch.float32 for v in runs["ring16"][0].values())
    # the ring splits the same bf16 computation over two processes and the wire carries bf16 exactly: on the CPU
    # the adapters come out equal (measured: 0.0); tests/test_cuda.py allows 1e-2 for GPU kernels
    assert_adapters_equal(runs["ring16"][0], runs["single16"][0], tol=1e-6)
    assert runs["ring16"][1]["final_loss"] == pytest.approx(runs["single16"][1]["final_loss"], rel=1e-6)
    # and bf16 really ran: not the fp32 result, and half the activation bytes of an fp32 ring would be
    with pytest.raises(AssertionError):
        assert_adapters_equal(runs["single16"][0], runs["single32"][0], tol=1e-6)
    act = runs["ring16"][1]["ranks"][1]["sent_by_kind"]["activation"]
    from ringada.comm import HEADER_BYTES

    per_message = (act["bytes"] - act["messages"] * HEADER_BYTES) / act["messages"]
    assert per_message == 2 * 16 * 32 * 2  # a micro-batch of 2 x 16 tokens x hidden 32 in 2 bytes
