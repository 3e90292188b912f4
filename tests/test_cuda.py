"""On a CUDA GPU: single, a ring of 2 and of 4 ranks sharing the GPU through gloo's pinned host staging, and a
star, each checked against the CPU reference (plain transformers + peft). fp32 with TF32 off; bf16 against a
bf16 single process. Skips without a GPU; scripts/gpu_check.sh runs it on one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.ranks import REPO, free_port
from tests.reference import assert_adapters_equal
from tests.test_ring import _cfg, _check_against_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")

# TF32 off in every process: fp32 on the GPU is then compared with fp32 on the CPU
ENV = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "0",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _run(raw: dict, world: int) -> dict:
    args = [a for section, keys in raw.items() for k, v in keys.items()
            for a in ("--set", f"{section}.{k}={json.dumps(v)}")]
    if world == 1:
        cmd = [sys.executable, "-m", "ringada", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "ringada", "train", *args]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(open(f"{raw['run']['out_dir']}/summary.json").read())


@pytest.mark.parametrize("mode, world, partition", [("single", 1, "even"), ("ring", 2, [1, 3]),
                                                    ("ring", 4, [1, 1, 1, 1]), ("line", 2, "even")])
def test_cuda_runs_match_the_cpu_reference(tmp_path, tiny_dirs, token_jsonl, mode, world, partition):
    raw = _cfg(tmp_path / "out", tiny_dirs["llama"], token_jsonl, mode=mode, partition=partition, micro=2,
               unfreeze={"initial": 2, "every": 2, "increment": 1}, steps=4)
    raw["run"].update({"device": "cuda", "checkpoint_every": 2})  # checkpoints gather CPU and CUDA state
    raw["run"].pop("message_log")
    summary = _run(raw, world)
    assert summary["world_size"] == world
    _check_against_reference(raw, tiny_dirs["llama"], token_jsonl)  # 1e-5 relative, losses to 1e-5


def test_cuda_star_with_one_device_matches_the_cpu_reference(tmp_path, tiny_dirs, token_jsonl):
    from ringada.config import from_dict
    from ringada.data import load_dataset
    from ringada.federated.shards import shard_rows
    from tests.reference import reference_train

    raw = {"run": {"out_dir": str(tmp_path / "out"), "seed": 5, "steps": 4, "eval_batches": 1, "device": "cuda"},
           "model": {"path": str(tiny_dirs["llama"])}, "adapter": {"r": 4, "alpha": 8},
           "data": {"train": str(token_jsonl), "eval": str(token_jsonl), "seq_len": 16, "batch_size": 4},
           "optim": {"lr": 0.01}, "pipeline": {"mode": "sfl"},
           "star": {"device_blocks": [1], "rounds": 2, "local_steps": 2}}
    _run(raw, 2)
    cfg = from_dict(raw)
    ds = load_dataset(str(token_jsonl), "train", task="causal_lm", seq_len=16)
    shard = ds.subset(shard_rows(ds.groups, 1, "iid", 0.5, cfg.run.seed, 4)[0], "device1")
    steps = [[(b.input_ids, b.labels, None)] for b in
             (shard.batch_at(s, 4, True, cfg.run.seed + 1)[1] for s in range(4))]
    want, _ = reference_train(str(tiny_dirs["llama"]), f"{tmp_path}/out/adapter_init", steps, frontiers=[0] * 4,
                              lr=0.01)
    assert_adapters_equal(load_file(f"{tmp_path}/out/adapter/adapter_model.safetensors"), want)


def test_cuda_bfloat16_ring_learns_what_a_bfloat16_single_process_learns(tmp_path, tiny_dirs, token_jsonl):
    outs = {}
    for mode, world in (("single", 1), ("ring", 4)):
        raw = _cfg(tmp_path / mode, tiny_dirs["llama"], token_jsonl, mode=mode, micro=2, steps=4)
        raw["run"].update({"device": "cuda", "dtype": "bfloat16"})
        raw["run"].pop("message_log")
        outs[mode] = _run(raw, world)
    got, want = (load_file(tmp_path / m / "adapter" / "adapter_model.safetensors") for m in ("ring", "single"))
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_adapters_equal(got, want, tol=1e-2)


def test_cuda_generate_gives_the_tokens_of_stock_peft_on_the_cpu(tmp_path, tiny_dirs):
    """Greedy decoding on the GPU (one process) picks the tokens that stock peft generate picks on the CPU."""
    from ringada.adapters import add_adapters, save_adapters
    from ringada.config import load
    from ringada.generate import GenerateOptions, generate
    from ringada.models import load_model
    from tests.test_generate import PROMPTS, peft_generate

    model_dir = tiny_dirs["llama"]
    cfg = load(None, [f"model.path={model_dir}", "adapter.r=4", "adapter.alpha=8", "pipeline.mode=single",
                      "run.device=cuda"])
    adapters = add_adapters(load_model(str(model_dir), "causal_lm"), cfg.adapter, 0, base_dir=str(model_dir))
    gen = torch.Generator().manual_seed(1)
    save_adapters(tmp_path / "adapter", {k: torch.randn(v.shape, generator=gen) * 0.3
                                         for k, v in adapters.state_dict().items()}, adapters.config_json)
    summary = generate(cfg, tmp_path / "adapter", PROMPTS, GenerateOptions(max_new_tokens=8, batch_size=2))
    assert [c["tokens"] for c in summary["completions"]] == peft_generate(model_dir, tmp_path / "adapter", PROMPTS,
                                                                          8, batch_size=2)
