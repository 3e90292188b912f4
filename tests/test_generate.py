"""Split inference: decode plans as data, the sampler, and generation across real gloo ranks, token for token
what plain transformers + peft ``generate`` produces with the same adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ringada.adapters import add_adapters, save_adapters
from ringada.config import ConfigError, load
from ringada.generate import (DecodeAction, DecodePlan, GenerateOptions, check_adapter, choose, decode_plan,
                              generate, read_prompts, row_generator)
from ringada.models import load_model, save_tiny

MAX_NEW = 10
PROMPTS = [[5, 9, 17, 3], [7, 8], [11, 12, 13, 14, 15, 16], [40], [3, 3, 60, 61, 62], [99, 98, 97]]


# ------------------------------------------------------------------------------------------------- plans (pure)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("micro", [1, 2, 5])
def test_decode_plans_validate(world, micro):
    plan = decode_plan(world, micro, 4)
    plan.validate()
    lead = plan.actions[0]
    if world > 1:
        # rank 0 starts every micro-batch's prefill before it takes the first one back from the closing edge
        first_recv = next(i for i, a in enumerate(lead) if a.kind == "r")
        assert [(a.kind, a.mb) for a in lead[:first_recv]] == [(k, m) for m in range(micro) for k in "Fs"]
        assert all(a.peer == world - 1 for a in lead if a.kind == "r")
        # every other rank relays each pass once: receive from below, its blocks, send up (the last: to rank 0)
        for r in range(1, world):
            assert [str(a) for a in plan.actions[r][:3]] == [f"r0.0<{r - 1}", "F0.0", f"s0.0>{(r + 1) % world}"]
            assert len(plan.actions[r]) == 3 * micro * 4


def test_decode_plan_validation_catches_reordered_channels_and_deadlocks():
    plan = decode_plan(3, 2, 2)
    swapped = [list(acts) for acts in plan.actions]
    r1 = swapped[1]
    i, j = r1.index(DecodeAction("r", 0, 0, 0)), r1.index(DecodeAction("r", 1, 0, 0))
    r1[i], r1[j] = r1[j], r1[i]
    with pytest.raises(ValueError, match="channel 0->1"):
        DecodePlan(3, 2, 2, swapped).validate()
    # rank 0 waiting for the closing edge before it sent anything: nothing can move
    stuck = [list(acts) for acts in plan.actions]
    stuck[0].insert(0, stuck[0].pop(stuck[0].index(DecodeAction("r", 0, 0, 2))))
    with pytest.raises(ValueError, match="deadlock"):
        DecodePlan(3, 2, 2, stuck).validate()
    with pytest.raises(ValueError):
        decode_plan(2, 0, 3)


# ------------------------------------------------------------------------------------------ sampler and inputs


def test_sampler_greedy_topk_topp_and_per_prompt_draws():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 4.0]])
    gens = [row_generator(0, 0), row_generator(0, 1)]
    assert choose(logits, GenerateOptions(), gens).tolist() == [1, 0]
    assert choose(logits, GenerateOptions(temperature=1.0, top_k=1), gens).tolist() == [1, 0]
    assert choose(logits, GenerateOptions(temperature=1.0, top_p=0.01), gens).tolist() == [1, 0]
    # top-k 2 never picks outside the two best; draws of a prompt do not depend on its batch neighbours
    opts = GenerateOptions(temperature=1.0, top_k=2, seed=7)
    wide = torch.zeros(1, 50)
    wide[0, 10], wide[0, 20] = 1.0, 1.2
    g_alone, g_batched = row_generator(7, 3), row_generator(7, 3)
    alone = [int(choose(wide, opts, [g_alone])[0]) for _ in range(40)]
    batched = [int(choose(torch.cat([torch.randn(1, 50), wide]), opts, [row_generator(7, 9), g_batched])[1])
               for _ in range(40)]
    assert set(alone) == {10, 20} and alone == batched


def test_read_prompts_and_option_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("ROMEO:\n\nJULIET:\n")
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"input_ids": [1, 2]}) + "\n")
    assert read_prompts(["x"], str(txt)) == ["x", "ROMEO:", "JULIET:"]
    assert read_prompts([], str(jl)) == ["a", [1, 2]]
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompts([], None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"label": 1}) + "\n")
    with pytest.raises(ConfigError, match="bad.jsonl:1: expected an object with 'text' or 'input_ids'"):
        read_prompts([], str(bad))
    bad.write_text(json.dumps({"input_ids": []}) + "\n")
    with pytest.raises(ConfigError, match="row 1 has neither"):
        read_prompts([], str(bad))
    with pytest.raises(ConfigError, match="--top-p"):
        GenerateOptions(top_p=0).check()
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        GenerateOptions(max_new_tokens=0).check()


# ------------------------------------------------------------------------------------------- against peft


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory):
    """family -> (model dir, adapter dir): a 5-block tiny model and a LoRA adapter far from zero. The llama one
    ends rows early: its generation config names a token it often picks as EOS."""
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for fam in ("llama", "gpt2"):
        model_dir = save_tiny(root / fam, fam, layers=5, hidden=32, vocab=128, seed=4)
        cfg = load(None, [f"model.path={model_dir}", "adapter.r=4", "adapter.alpha=8"])
        cut = load_model(str(model_dir), "causal_lm")
        adapters = add_adapters(cut, cfg.adapter, 0, base_dir=str(model_dir))
        g = torch.Generator().manual_seed(1)
        state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in adapters.state_dict().items()}
        save_adapters(root / f"{fam}-adapter", state, adapters.config_json)
        out[fam] = (model_dir, root / f"{fam}-adapter")
    # Pick as EOS the token that stock generate chooses most often in the middle of a completion
    model_dir, adapter_dir = out["llama"]
    ref = peft_generate(model_dir, adapter_dir, PROMPTS, MAX_NEW, batch_size=1)
    middle = [t for row in ref for t in row[2:6]]
    eos = max(set(middle), key=middle.count)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 0,
                                                                  "bos_token_id": 1}))
    return out


def peft_generate(model_dir, adapter_dir, prompts, max_new, batch_size):
    """Plain transformers + peft: left-padded batches, greedy; each row cut after its first EOS."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    gen = base.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    pad = gen.pad_token_id if gen.pad_token_id is not None else eos[0]
    rows = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)
        for b in range(len(batch)):
            row = out[b, width:].tolist()
            ends = [j for j, t in enumerate(row) if t in eos]
            rows.append(row[:ends[0] + 1] if ends else row)
    return rows


def _cfg(model_dir, out, partition="even"):
    return {"run": {"out_dir": str(out), "seed": 0, "timeout_s": 60},
            "model": {"path": str(model_dir)}, "adapter": {"kind": "lora", "r": 4, "alpha": 8},
            "pipeline": {"mode": "ring", "partition": partition}}


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_one_process_equals_peft_generate(tiny_adapters, tmp_path, fam):
    model_dir, adapter_dir = tiny_adapters[fam]
    cfg = load(None, [f"model.path={model_dir}", "adapter.r=4", "adapter.alpha=8", "pipeline.mode=single"])
    summary = generate(cfg, adapter_dir, PROMPTS, GenerateOptions(max_new_tokens=MAX_NEW, batch_size=2),
                       out=tmp_path / "gen.jsonl")
    got = [c["tokens"] for c in summary["completions"]]
    assert got == peft_generate(model_dir, adapter_dir, PROMPTS, MAX_NEW, batch_size=2)
    if fam == "llama":  # the EOS chosen above ends some rows early, and stock generate agrees where
        assert any(len(row) < MAX_NEW for row in got)
    lines = [json.loads(line) for line in open(tmp_path / "gen.jsonl")]
    assert [line["tokens"] for line in lines] == got
    assert summary["new_tokens"] == sum(map(len, got))


def test_adapter_settings_must_match_the_config(tiny_adapters, tmp_path):
    model_dir, adapter_dir = tiny_adapters["llama"]
    with pytest.raises(ConfigError, match="adapter.alpha"):
        check_adapter(load(None, [f"model.path={model_dir}", "adapter.r=4", "adapter.alpha=16"]), adapter_dir)
    with pytest.raises(ConfigError, match="adapter_model.safetensors"):
        check_adapter(load(None, [f"model.path={model_dir}"]), tmp_path)


@pytest.mark.parametrize("fam,partition,batch,in_flight", [("llama", [1, 4], 2, 2), ("gpt2", [3, 2], 1, 4)])
def test_ring_of_two_equals_peft_generate(pool2, tiny_adapters, tmp_path, fam, partition, batch, in_flight):
    _ring_check(pool2, tiny_adapters[fam], tmp_path, partition, batch, in_flight)


def test_ring_of_three_equals_peft_generate(pool3, tiny_adapters, tmp_path):
    # uneven, rank 0 holds no block at all, several micro-batches in flight, rows ending early (EOS)
    summary = _ring_check(pool3, tiny_adapters["llama"], tmp_path, [0, 2, 3], 2, 3)
    ranks = summary["ranks"]
    assert [r["blocks"] for r in ranks] == [[0, 0], [0, 2], [2, 5]]
    # memory: a rank holds its slice (rank 0: embedding + head), and the KV cache of its own blocks only
    kv = [r["kv_cache_peak_bytes"] for r in ranks]
    assert kv[0] == 0 and 0 < kv[1] < kv[2]
    assert ranks[1]["model_bytes"] < ranks[2]["model_bytes"]
    assert all(r["sent_by_kind"]["activation"]["messages"] > 0 for r in ranks)
    # a rank frees what it sent of a pass once the micro-batch's next pass comes round; without that it would
    # hold every byte it sent in the wave (one here) until the wave's end (rank 0 also holds the adapters it sent)
    assert all(r["sends_held_peak_bytes"] < r["bytes_sent"] / 2 for r in ranks[1:]), ranks


def _ring_check(pool, dirs, tmp_path, partition, batch, in_flight):
    model_dir, adapter_dir = dirs
    out = tmp_path / "gen.jsonl"
    pool.run(_cfg(model_dir, tmp_path / "run", partition),
             generate={"adapter": str(adapter_dir), "prompts": PROMPTS, "out": str(out),
                       "options": {"max_new_tokens": MAX_NEW, "batch_size": batch, "in_flight": in_flight}})
    got = [json.loads(line)["tokens"] for line in open(out)]
    assert got == peft_generate(model_dir, adapter_dir, PROMPTS, MAX_NEW, batch_size=batch)
    summary = json.loads((tmp_path / "gen.summary.json").read_text())
    assert summary["world_size"] == len(partition) and summary["new_tokens"] == sum(map(len, got))
    return summary


def test_generate_bench_systems_decode_every_prompt_once():
    from ringada.bench import GENERATE_SYSTEMS, generate_settings

    for prompts, world in ((8, 4), (7, 3), (1, 2)):
        for system in GENERATE_SYSTEMS:
            procs, opts = generate_settings(system, prompts, world)
            assert procs == (1 if system.startswith("single") else world)
            assert opts["batch_size"] >= 1 and opts["in_flight"] >= 1
        # the batched ring puts every prompt in one wave of `world` micro-batches
        _, opts = generate_settings("ring-generate-batched", prompts, world)
        assert opts["batch_size"] * world >= prompts > (opts["batch_size"] - 1) * world
    with pytest.raises(ValueError, match="unknown decoding system"):
        generate_settings("tdp-generate", 8, 4)


def test_a_silent_rank_stops_decoding_with_an_error_naming_rank_peer_and_pass(tiny_dirs, tiny_adapters, tmp_path):
    """Failure rules as in training: a rank that stops answering (SIGSTOP) is an error within run.timeout_s on
    the ranks waiting for it, naming this rank, the peer, the pass and the plan action."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from tests.ranks import REPO, free_port

    model_dir = shutil.copytree(tiny_adapters["llama"][0], tmp_path / "model")
    (model_dir / "generation_config.json").write_text(json.dumps({"pad_token_id": 0}))  # no EOS: decode on
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS[:3]))
    args = ["generate", "--set", f"model.path={model_dir}", "--set", "adapter.r=4", "--set", "adapter.alpha=8",
            "--set", "pipeline.mode=ring", "--set", "run.timeout_s=4", "--adapter", str(tiny_adapters["llama"][1]),
            "--prompts", str(prompts), "--max-new-tokens", "200000"]
    world, port = 3, free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = [tmp_path / f"rank{r}.log" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, "-m", "ringada", *args], cwd=REPO, stdout=open(logs[r], "w"),
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(world)]
    try:
        deadline = time.monotonic() + 120
        while "pass 50/" not in logs[0].read_text():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-2000:]
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        for r in (0, 2):
            procs[r].wait(timeout=60)
        noticed = time.monotonic() - stopped
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    assert noticed < 3 * 4, noticed
    for r in (0, 2):
        text = logs[r].read_text()
        assert procs[r].returncode == 1, text[-2000:]
        assert f"ringada: error: rank {r}: receiving activation" in text and "[decode action r" in text
    # rank 2 waits on rank 1 itself and times out; rank 0, waiting on rank 2, then finds it gone (or times out)
    assert "with rank 1 at step" in logs[2].read_text() and "run.timeout_s=4 s" in logs[2].read_text()
    assert "with rank 2 at step" in logs[0].read_text()
