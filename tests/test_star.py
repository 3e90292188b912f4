"""Star mode on real gloo processes: SFL with one device equals plain single-process training; label privacy
does not change what is learned; compression cuts the bytes on the wire; skipped rounds change nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ringada.config import from_dict
from ringada.data import load_dataset
from ringada.federated.shards import shard_rows
from tests.reference import assert_adapters_equal, reference_train


def _cfg(out, model_dir, data, *, mode="sfl", devices=(2,), rounds=2, local_steps=2, **star):
    return {
        "run": {"out_dir": str(out), "seed": 5, "steps": rounds * local_steps, "eval_batches": 2},
        "model": {"path": str(model_dir)},
        "adapter": {"r": 4, "alpha": 8},
        "data": {"train": str(data), "eval": str(data), "seq_len": 16, "batch_size": 4},
        "optim": {"lr": 0.01},
        "pipeline": {"mode": mode},
        "star": {"device_blocks": list(devices), "rounds": rounds, "local_steps": local_steps, **star},
    }


def _adapter(out):
    return load_file(f"{out}/adapter/adapter_model.safetensors")


@pytest.mark.parametrize("server_micro_batches", [1, 3])
def test_one_device_sfl_equals_single_process_training(pool2, tmp_path, tiny_dirs, token_jsonl,
                                                       server_micro_batches):
    """Also when the server runs the device's 4 rows as pieces of 2, 1 and 1 rows."""
    raw = _cfg(tmp_path / "out", tiny_dirs["llama"], token_jsonl, devices=[1], rounds=3, local_steps=2,
               server_micro_batches=server_micro_batches)
    pool2.run(raw)
    cfg = from_dict(raw)
    ds = load_dataset(str(token_jsonl), "train", task="causal_lm", seq_len=16)
    shard = ds.subset(shard_rows(ds.groups, 1, "iid", 0.5, cfg.run.seed, 4)[0], "device1")
    steps = [[(b.input_ids, b.labels, None)] for b in
             (shard.batch_at(s, 4, True, cfg.run.seed + 1)[1] for s in range(cfg.run.steps))]
    want, want_losses = reference_train(str(tiny_dirs["llama"]), f"{tmp_path}/out/adapter_init", steps,
                                        frontiers=[0] * len(steps), lr=0.01)
    assert_adapters_equal(_adapter(tmp_path / "out"), want)
    metrics = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in metrics]), torch.tensor(want_losses), rtol=1e-5,
                               atol=0)
    summary = json.loads(open(tmp_path / "out" / "summary.json").read())
    assert [r["round_finished"] for r in summary["rounds_log"]] == [[1]] * 3
    # a round's makespan runs on past the server's last step: until the device's backward and adapters are done
    assert all(r["round_trained_s"] > r["round_s"] > 0 for r in summary["rounds_log"])
    assert sorted(p.name for p in (tmp_path / "out" / "rounds").iterdir()) == ["round_0000", "round_0001",
                                                                               "round_0002"]


@pytest.mark.parametrize("mode", ["sfl", "sft"])
def test_label_privacy_learns_the_same_adapters(pool4, tmp_path, tiny_dirs, token_jsonl, mode):
    """... as the server with the head, which here also runs each device's rows in two pieces."""
    outs = {}
    for privacy in (False, True):
        out = tmp_path / f"privacy-{privacy}"
        pool4.run(_cfg(out, tiny_dirs["llama"], token_jsonl, mode=mode, devices=[1, 2, 3], label_privacy=privacy,
                       schedule="optimal", server_micro_batches=1 if privacy else 2))
        outs[privacy] = out
    assert_adapters_equal(_adapter(outs[True]), _adapter(outs[False]))
    # and the adapters did train: the global adapter moved away from its initialization
    init = load_file(f"{outs[True]}/adapter_init/adapter_model.safetensors")
    assert any(not torch.equal(init[k], v) for k, v in _adapter(outs[True]).items())
    s = [json.loads(open(o / "summary.json").read()) for o in outs.values()]
    assert s[0]["eval_loss"] == pytest.approx(s[1]["eval_loss"], rel=1e-5)
    # under label privacy no labels travel and the server holds no head
    assert all(r["sent_by_kind"]["labels"]["messages"] == 0 for r in s[1]["ranks"])
    assert s[1]["ranks"][0]["recv_by_kind"]["top_gradient"]["messages"] > 0


def test_sfl_server_keeps_one_base_and_a_lora_set_per_device(pool4, tmp_path, tiny_dirs, token_jsonl):
    """One frozen base with a LoRA set per device learns exactly what a base copy per device learns, in a
    fraction of the server memory; the copy-per-device figure in the summary is what the copies really hold."""
    summaries = {}
    for copies in (False, True):
        out = tmp_path / f"copies-{copies}"
        pool4.run(_cfg(out, tiny_dirs["llama"], token_jsonl, devices=[1, 2, 3], rounds=1, server_copies=copies))
        summaries[copies] = json.loads(open(out / "summary.json").read())
    assert_adapters_equal(_adapter(tmp_path / "copies-True"), _adapter(tmp_path / "copies-False"))
    shared, copies = summaries[False]["server"], summaries[True]["server"]
    assert shared["sets"] == copies["sets"] == 3
    # three copies of the server-side blocks (3, 2 and 1 of them) vs one base holding blocks 1..3
    assert shared["copy_per_device_base_bytes"] > shared["base_bytes"]
    assert copies["base_bytes"] == shared["copy_per_device_base_bytes"] == copies["copy_per_device_base_bytes"]
    assert shared["held_bytes"] < copies["held_bytes"]
    metrics = [json.loads(line) for line in open(tmp_path / "copies-False" / "metrics.jsonl")]
    assert all(sorted(m["order"]) == [1, 2, 3] and m["predicted_makespan_s"] >= 0 for m in metrics)


def test_compression_cuts_smashed_bytes(pool4, tmp_path, tiny_dirs, token_jsonl):
    sizes, smashed = {}, {}
    for name, comp in {"plain": {}, "compressed": {"topk": 0.1, "bits": 4, "lossless": "zlib"}}.items():
        raw = _cfg(tmp_path / name, tiny_dirs["llama"], token_jsonl, mode="sft", devices=[2, 2, 2], rounds=1)
        raw["compress"] = comp
        raw["data"]["seq_len"] = 64  # larger activations, so headers do not dominate
        pool4.run(raw)
        summary = json.loads(open(tmp_path / name / "summary.json").read())
        sizes[name] = sum(r["sent_by_kind"][k]["bytes"] for r in summary["ranks"] for k in ("activation", "gradient"))
        smashed[name] = summary["compress"]["smashed"]
        # evaluations (exact, and through the codec when lossy) are counted under their own kind
        evals = sum(r["sent_by_kind"]["eval_activation"]["messages"] for r in summary["ranks"])
        assert evals == 2 * 2 * (2 if comp else 1)  # before + after, 2 batches, one pass per eval link
    assert sizes["compressed"] <= 0.2 * sizes["plain"]
    assert smashed["plain"]["ratio"] == 1 and smashed["compressed"]["ratio"] < 0.1
    assert smashed["compressed"]["raw_bytes"] == smashed["plain"]["raw_bytes"]


def test_compressed_links_both_ways_and_both_evaluations(pool4, tmp_path, tiny_dirs, token_jsonl):
    """Label privacy puts all four smashed kinds on the wire; each goes through its direction's codec, the
    gradients with error feedback. eval_loss is the exact link's; the codec's evaluation is reported beside it."""
    out = tmp_path / "out"
    raw = _cfg(out, tiny_dirs["llama"], token_jsonl, devices=[1, 2, 3], rounds=2, local_steps=1, label_privacy=True)
    raw["compress"] = {"bits": 3, "grad_bits": 6, "hadamard": 16, "group": 8, "outliers": 0.01,
                       "error_feedback": True, "lossless": "zlib"}
    pool4.run(raw)
    summary = json.loads(open(out / "summary.json").read())
    comp = summary["compress"]
    assert comp["bits"] == 3 and comp["hadamard"] == 16 and comp["eval"] == "exact"
    assert comp["eval_links"] == ["exact", "codec"]
    smashed = comp["smashed"]["by_message"]
    assert sorted(smashed) == ["activation", "gradient", "top", "top_gradient"]
    assert all(0 < m["coded_bytes"] < 0.5 * m["raw_bytes"] for m in smashed.values())
    assert smashed["activation"]["coded_bytes"] < smashed["gradient"]["coded_bytes"]  # 3 bits up, 6 down
    # the wire counted what travelled: each gradient blob, plus the message header and the skip flag
    from ringada.comm import HEADER_BYTES

    sent = summary["ranks"][0]["sent_by_kind"]["gradient"]
    assert sent["messages"] == smashed["gradient"]["messages"] == 6
    assert sent["bytes"] == smashed["gradient"]["coded_bytes"] + 6 * (HEADER_BYTES + 8)
    exact, codec = summary["eval_after_exact"], summary["eval_after_codec"]
    assert summary["eval_loss"] == exact["eval_loss"] and summary["eval_after"]["eval_link"] == "exact"
    assert summary["eval_after"]["eval_loss_codec"] == codec["eval_loss"] != exact["eval_loss"]
    assert summary["eval_before"]["eval_link"] == "exact" and "eval_loss_codec" in summary["eval_before"]
    assert math.isfinite(summary["final_loss"])


def test_a_hadamard_block_that_does_not_tile_the_hidden_size_is_refused(tiny_dirs):
    from ringada.config import ConfigError, load
    from ringada.star import make_star_topology

    cfg = load(None, ["run.steps=1", "pipeline.mode=sft", f"model.path={tiny_dirs['llama']}", "star.device_blocks=[1]",
                      "compress.bits=4", "compress.hadamard=64"])
    with pytest.raises(ConfigError, match="hadamard: got 64, which does not divide the model's hidden size 32"):
        make_star_topology(cfg, 0, 3)


def test_a_round_below_min_devices_leaves_the_global_adapter_unchanged(pool4, tmp_path, tiny_dirs, token_jsonl):
    # round 0 has no measured step times, so nobody leaves; from round 1 the tiny dwell times make all drop out
    raw = _cfg(tmp_path / "out", tiny_dirs["llama"], token_jsonl, devices=[1, 2, 3], rounds=3, local_steps=2,
               mobility="exponential", dwell_mean=1e-6, min_devices=2)
    pool4.run(raw)
    summary = json.loads(open(tmp_path / "out" / "summary.json").read())
    log = summary["rounds_log"]
    assert log[0]["round_finished"] == [1, 2, 3] and not log[0]["round_skipped"]
    assert log[1]["round_skipped"] and log[1]["round_dropped"] == [1, 2, 3]
    rounds = tmp_path / "out" / "rounds"
    first, second = (load_file(rounds / r / "adapter_model.safetensors") for r in ("round_0000", "round_0001"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_sft_allocation_plans_depths_and_keep_ratios_from_a_profile(pool4, tmp_path, tiny_dirs, token_jsonl):
    from ringada.config import load
    from ringada.star import make_star_topology

    cfg = load("configs/sft_smollm2.yaml", ["star.allocate=true", "star.profile=configs/profiles/edge4.yaml",
                                            "star.error_budget=1.0"])
    topo = make_star_topology(cfg, 0, 5)
    # edge4's budgets grow with the device index (200 to 700 MB): the planned depths follow them
    assert topo.depths == sorted(topo.depths) and topo.depths[0] < topo.depths[-1]
    assert sum(1 - r for r in topo.keep_ratios) <= 1.0 + 1e-6 and all(0 < r <= 1 for r in topo.keep_ratios)
    assert topo.allocation["predicted_round_delay_s"] > 0 and len(topo.depths) == 4
    # the same plan drives a real (tiny) run: devices get the planned depths, the summary carries the plan
    profile = tmp_path / "tiny.yaml"
    profile.write_text("server: {gflops: 50}\ndevices:\n" + "".join(
        f"  - {{gflops: {g}, memory_mb: 0.2}}\n" for g in (1, 2, 4)) + "links: {uplink_mbps: 10, downlink_mbps: 10}\n")
    raw = _cfg(tmp_path / "out", tiny_dirs["llama"], token_jsonl, mode="sft", devices=[1], rounds=1,
               allocate=True, profile=str(profile), error_budget=0.5)
    pool4.run(raw)
    summary = json.loads(open(tmp_path / "out" / "summary.json").read())
    assert summary["device_blocks"] == summary["allocation"]["depths"]
    assert [r["blocks"] for r in summary["ranks"][1:]] == [[0, d] for d in summary["device_blocks"]]


def test_sft_views_take_blocks_below_a_devices_cut_from_the_device():
    """In sft the shared server set reaches down to the shallowest cut; a deeper device trained those blocks on
    itself, so its view must hold its own copies there (and the server's from its cut up)."""
    from torch import nn

    from ringada.adapters import AdapterParam, Adapters
    from ringada.star import Server, StarTopology

    server = Server.__new__(Server)
    server.sft, server.topo = True, StarTopology(rank=0, world_size=3, num_blocks=4, depths=[1, 3])
    shared = {b: nn.Parameter(torch.full((2,), float(10 + b))) for b in (1, 2, 3)}
    server.sets = {"shared": Adapters("lora", [AdapterParam(f"m.layers.{b}.A", p, b) for b, p in shared.items()])}
    device_views = {1: {"m.layers.0.A": torch.zeros(2)},
                    2: {f"m.layers.{b}.A": torch.full((2,), float(b)) for b in (0, 1, 2)}}
    out = server.global_state(device_views, [1, 2], {1: 1.0, 2: 3.0})
    # block 1: device 1's rows used the shared copy (11), device 2 its own (1): (1*11 + 3*1) / 4
    torch.testing.assert_close(out["m.layers.1.A"], torch.full((2,), (11 + 3 * 1) / 4))
    torch.testing.assert_close(out["m.layers.2.A"], torch.full((2,), (12 + 3 * 2) / 4))
    torch.testing.assert_close(out["m.layers.3.A"], torch.full((2,), 13.0))  # server side for both
    torch.testing.assert_close(out["m.layers.0.A"], torch.full((2,), 0.0))


def test_sft_allocation_with_a_quantizing_codec_picks_measured_bits_within_the_loss_budget(
        pool4, tmp_path, tiny_dirs, token_jsonl, monkeypatch):
    """compress.bits > 0: the allocation measures each menu setting's loss increase at the devices' cuts and
    gives every device bits whose measured increase stays within star.loss_budget; the run uses them."""
    from ringada import calibrate
    from ringada.config import load
    from ringada.star import _link_codecs, make_star_topology

    monkeypatch.setenv("RINGADA_CACHE", str(tmp_path / "cache"))
    profile = tmp_path / "slow-links.yaml"  # links slow enough that compressing pays
    profile.write_text("server: {gflops: 50}\ndevices:\n" + "".join(
        f"  - {{gflops: {g}, memory_mb: 1}}\n" for g in (1, 2, 4)) + "links: {uplink_mbps: 0.1, downlink_mbps: 10}\n")
    raw = _cfg(tmp_path / "out", tiny_dirs["llama"], token_jsonl, mode="sft", devices=[1], rounds=1,
               allocate=True, profile=str(profile), loss_budget=0.02)
    raw["data"]["seq_len"] = 32
    raw["compress"] = {"bits": 3, "scale": "token", "hadamard": 16, "rounding": "nearest", "lossless": "zlib"}
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    topo = make_star_topology(load(str(path)), 0, 4)
    plan = topo.allocation
    assert all(b in (0, *calibrate.codec_menu(load(str(path)))) for b in topo.bits)
    assert all(e <= 0.02 for e in plan["measured_loss_increase"])
    assert any(b > 0 for b in topo.bits)  # slow links: some device compresses
    # the measurement is cached: a second plan reads it and agrees
    assert make_star_topology(load(str(path)), 0, 4).bits == topo.bits
    assert len(list((tmp_path / "cache" / "calibration").glob("*.json"))) == 1
    codecs = _link_codecs(load(str(path)), topo)
    assert [codecs[u].activation.bits for u in topo.devices] == topo.bits
    assert all(codecs[u].gradient.bits == 3 for u in topo.devices)  # gradients keep compress.bits
    pool4.run({**raw, "run": {**raw["run"], "out_dir": str(tmp_path / "out")}})
    summary = json.loads(open(tmp_path / "out" / "summary.json").read())
    assert summary["allocation"]["bits"] == topo.bits and summary["device_blocks"] == topo.depths


def test_calibration_curves_keep_the_worst_cut_and_the_budget():
    from ringada.calibrate import cuts_to_measure, device_curve

    assert cuts_to_measure(1) == [1] and cuts_to_measure(6) == [1, 2, 4, 6] and cuts_to_measure(8) == [1, 2, 4, 8]
    cal = {"cuts": [1, 2, 4], "bits": [3, 4, 8], "ratio": [[0.07, 0.09, 0.26], [0.08, 0.1, 0.26], [0.09, 0.1, 0.26]],
           "loss_increase": [[0.03, 0.004, -0.001], [0.05, 0.008, 0.0], [0.2, 0.02, 0.001]]}
    assert device_curve(cal, 2, 0.01) == [(4, 0.1, 0.008), (8, 0.26, 0.0)]  # cuts 1 and 2; 3 bits too lossy
    assert device_curve(cal, 4, 1.0) == [(3, 0.09, 0.2), (4, 0.1, 0.02), (8, 0.26, 0.001)]
