"""Capacity-aware partition from measured costs and a profile; the discrete-event simulator."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from ringada.config import ConfigError, load
from ringada.partition import capacity_partition, plan_capacity, stage_times


def _profile(tmp_path, memories, gflops=(50, 10, 25, 50)):
    path = tmp_path / "p.yaml"
    path.write_text("reference_gflops: 50\ndevices:\n" + "".join(
        f"  - {{gflops: {g}, memory_mb: {m}}}\n" for g, m in zip(gflops, memories))
        + "links: {uplink_mbps: 100, latency_ms: 1}\n")
    return str(path)


def test_capacity_partition_respects_budgets_and_is_the_fastest_split(tmp_path, tiny_dirs):
    cfg = load(None, [f"model.path={tiny_dirs['llama']}", "pipeline.mode=ring", "pipeline.partition=capacity",
                      f"pipeline.profile={_profile(tmp_path, [50, 0.2, 50, 50])}", "data.seq_len=16",
                      "data.batch_size=4", "data.micro_batches=2", "data.train=x.jsonl"])
    partition, details = plan_capacity(cfg, 4)
    caps = details["max_blocks"]
    assert caps[1] == 1 and caps[0] >= 4  # 0.2 MB holds one tiny block (weights + saved activations)
    assert sum(partition) == 4 and all(b <= cap for b, cap in zip(partition, caps)) and partition[1] == 1
    assert details["speeds"] == [1.0, 0.2, 0.5, 1.0]
    block, extra = details["block_cost_s"], details["extra_cost_s"]
    best = min(max(stage_times(list(p), block, extra)) for p in itertools.product(range(5), repeat=4)
               if sum(p) == 4 and all(1 <= b <= c for b, c in zip(p[1:], caps[1:])) and p[0] <= caps[0])
    assert max(details["stage_s"]) == pytest.approx(best)


def test_no_split_fits_is_a_clear_config_error(tmp_path, tiny_dirs):
    from ringada.runtime import make_topology

    cfg = load(None, [f"model.path={tiny_dirs['llama']}", "pipeline.mode=ring", "pipeline.partition=capacity",
                      f"pipeline.profile={_profile(tmp_path, [0.01, 0.01, 0.01, 0.01])}", "data.seq_len=16",
                      "data.batch_size=4"])
    with pytest.raises(ConfigError, match="memory budget fits 0|no split fits"):
        make_topology(cfg, 0, 4)


def test_capacity_needs_a_profile():
    with pytest.raises(ConfigError, match="pipeline.profile: got null"):
        load(None, ["pipeline.mode=ring", "pipeline.partition=capacity"])


def test_capacity_partition_prefers_fast_ranks():
    assert capacity_partition(12, [1.0, 4.0, 1.0], [2.0, 0.0, 0.0], [12, 12, 12], [0, 1, 1]) == [5, 1, 6]


def _unit_costs(**kw):
    from ringada.costs import Costs

    base = dict(rows=1, seq_len=4, block_fwd_s=1.0, block_bwd_s=2.0, head_fwd_s=0.0, head_bwd_s=0.0, embed_s=0.0,
                act_bytes=0)
    base.update(kw)
    return Costs(**base)


def _line_cfg(**extra):
    return load(None, ["pipeline.mode=line", "pipeline.schedule=gpipe", "data.batch_size=2", "data.micro_batches=2",
                       "run.steps=1", *[f"{k}={v}" for k, v in extra.items()]])


def test_simulator_event_logic_by_hand(tmp_path):
    from ringada.profiles import load_profile
    from ringada.sim import simulate_pipeline

    # line [1, 1], 2 micro-batches, gpipe: r0 F F . . . B B; r1 . F F B B -> 1+1+1+2+2 then r0's two backwards
    result = simulate_pipeline(_line_cfg(), [1, 1], _unit_costs())
    assert result["wall_s"] == pytest.approx(9.0)
    assert [r["fwd_s"] for r in result["ranks"]] == [2.0, 2.0] and [r["bwd_s"] for r in result["ranks"]] == [4, 4]
    # one second of latency per message (4 messages on the critical path chain shift it to 11)
    path = tmp_path / "slow.yaml"
    path.write_text("reference_gflops: 1\ndevices:\n  - {gflops: 1, memory_mb: 1}\n  - {gflops: 1, memory_mb: 1}\n"
                    "links: {uplink_mbps: 1000000, latency_ms: 1000}\n")
    slow = simulate_pipeline(_line_cfg(), [1, 1], _unit_costs(), load_profile(path))
    assert slow["wall_s"] == pytest.approx(11.0, rel=1e-6)
    # a frontier above every block: no backward anywhere, the step is forwards only (3 time units)
    frozen = simulate_pipeline(_line_cfg(**{"unfreeze.initial": 0, "unfreeze.every": 10}), [1, 1], _unit_costs())
    assert frozen["wall_s"] == pytest.approx(3.0) and all(r["bwd_s"] == 0 for r in frozen["ranks"])
    # without early stop the same frozen run pays the whole backward again (9 units)
    full = simulate_pipeline(_line_cfg(**{"unfreeze.initial": 0, "unfreeze.every": 10, "pipeline.early_stop": "false"}),
                             [1, 1], _unit_costs())
    assert full["wall_s"] == pytest.approx(9.0)
    # both ranks on one core: the 12 units of compute run one after another; on two cores the timeline (9) holds.
    # On one core rank 0 computes F0 alone [0, 1], F1 beside rank 1's F0 [1, 3], B0 beside rank 1's B1 [6, 10]
    # and B1 alone [10, 12]: 9 s computing, 3 s waiting (rank 1 the same)
    one_core = simulate_pipeline(_line_cfg(), [1, 1], _unit_costs(), cores=1)
    assert one_core["wall_s"] == pytest.approx(12.0) and [r["wait_s"] for r in one_core["ranks"]] == [3.0, 3.0]
    assert [r["fwd_s"] for r in one_core["ranks"]] == [2.0, 2.0] and [r["cpu_s"] for r in one_core["ranks"]] == [6, 6]
    assert one_core["cpu_s_per_step"] == 12.0 and one_core["utilization"] == pytest.approx(1.0)
    two_cores = simulate_pipeline(_line_cfg(), [1, 1], _unit_costs(), cores=2)
    assert two_cores["wall_s"] == pytest.approx(9.0) and two_cores["utilization"] == pytest.approx(12 / 18)


def test_simulator_pipeline_speeds_sleep_and_message_cost(tmp_path):
    from ringada import schedule as sched
    from ringada.comm import HEADER_BYTES
    from ringada.profiles import load_profile
    from ringada.sim import simulate_pipeline

    # rank 1 at half speed: with a core per rank, the same timeline as compute / speed on every rank
    path = tmp_path / "half.yaml"
    path.write_text("reference_gflops: 2\ndevices:\n  - {gflops: 2, memory_mb: 1}\n  - {gflops: 1, memory_mb: 1}\n"
                    "links: {uplink_mbps: 1000000, latency_ms: 0}\n")
    half = load_profile(path)
    plan = sched.build_schedule("line", [1, 1], 2, 0)
    ref = sched.simulate(plan, lambda a: (1.0 if a.kind == sched.F else 2.0) * (2.0 if a.stage == 1 else 1.0),
                         lambda a: half.link_seconds(HEADER_BYTES))
    result = simulate_pipeline(_line_cfg(), [1, 1], _unit_costs(), half)
    # r0 F0 [0, 1] F1 [1, 2]; r1 F0 [1, 3] F1 [3, 5] B0 [5, 9] B1 [9, 13]; r0 B0 [9, 11] B1 [13, 15]
    assert result["wall_s"] == pytest.approx(ref["makespan"]) and ref["makespan"] == pytest.approx(15.0, rel=1e-6)
    assert [r["fwd_s"] for r in result["ranks"]] == [2.0, 4.0] and [r["cpu_s"] for r in result["ranks"]] == [6, 6]
    # on one core rank 1 computes at this machine's speed and sleeps as long again, holding no core, but a
    # compute stretched by sharing stretches its sleep: r0 F0 [0, 1]; r0 F1 and r1 F0 share [1, 3], r1 sleeps
    # [3, 5]; r1 F1 [5, 6] sleep [6, 7], B0 [7, 9] sleep [9, 11]; r0 B0 and r1 B1 share [11, 15], r1 sleeps 4
    # [15, 19]; r0 B1 [19, 21]
    one = simulate_pipeline(_line_cfg(), [1, 1], _unit_costs(), half, cores=1)
    assert one["wall_s"] == pytest.approx(21.0, rel=1e-6) and one["cpu_s_per_step"] == 12.0
    assert [r["wait_s"] for r in one["ranks"]] == pytest.approx([21 - 9, 21 - 18], rel=1e-6)
    # 1 s of CPU per send and per receive (8 messages): line [1, 1], F 1, B 2, no link time. r0: F0 [0, 1], sF0
    # [1, 2], F1 [2, 3], sF1 [3, 4]; r1: rF0 [2, 3], F0 [3, 4], rF1 [4, 5], F1 [5, 6], B0 [6, 8], sB0 [8, 9], B1
    # [9, 11], sB1 [11, 12]; r0: rB0 [9, 10], B0 [10, 12], rB1 [12, 13], B1 [13, 15]
    msg = simulate_pipeline(_line_cfg(), [1, 1], _unit_costs(), msg_cost_per_byte=1 / HEADER_BYTES)
    assert msg["wall_s"] == pytest.approx(15.0) and [r["cpu_s"] for r in msg["ranks"]] == pytest.approx([10, 10])
    assert [r["wait_s"] for r in msg["ranks"]] == pytest.approx([5.0, 5.0])
    with pytest.raises(ValueError, match="msg_cost_per_byte"):
        simulate_pipeline(_line_cfg(), [1, 1], _unit_costs(), msg_cost_per_byte=-1.0)


def test_simulator_scales_to_64_ranks_and_1000_devices():
    import time

    from ringada.profiles import DeviceSpec, Profile
    from ringada.sim import simulate_pipeline, simulate_star_step

    t0 = time.perf_counter()
    cfg = load(None, ["pipeline.mode=ring", "data.batch_size=16", "data.micro_batches=16", "run.steps=2"])
    ring = simulate_pipeline(cfg, [0] + [2] * 63, _unit_costs(head_fwd_s=3.0, head_bwd_s=3.0))
    assert len(ring["ranks"]) == 64 and ring["wall_s"] > 0
    profile = Profile(server_gflops=500, devices=tuple(DeviceSpec(f"d{i}", 5 + i % 7, 100) for i in range(1000)),
                      uplink_mbps=1000, downlink_mbps=1000, latency_ms=5)
    star = simulate_star_step("sfl", [1 + i % 5 for i in range(1000)], 30, _unit_costs(act_bytes=10_000), profile)
    assert sorted(star["order"]) == list(range(1, 1001)) and star["makespan_s"] <= star["fifo_makespan_s"] + 1e-9
    assert time.perf_counter() - t0 < 10


def test_star_step_formula_for_sft():
    from ringada.profiles import DeviceSpec, Profile
    from ringada.sim import simulate_star_step

    profile = Profile(server_gflops=50, devices=(DeviceSpec("a", 50, 1), DeviceSpec("b", 25, 1)),
                      uplink_mbps=1e9, downlink_mbps=1e9, latency_ms=0)
    step = simulate_star_step("sft", [1, 2], 4, _unit_costs(), profile)
    # release: 1/1, 2/0.5 = 4; server: (3*3) + (2*3) = 15; tail: 2/1, 4/0.5 = 8 -> 4 + 15 + 8
    assert step["makespan_s"] == pytest.approx(27.0, rel=1e-6)
    # sharing one core: the devices' forwards share it until a's ends at 2 (b has done 1 of its 2), b's ends at 3
    # and b sleeps 3 (its wall time, at half speed); the server gets b's activation at 6 and computes to 21; the
    # backwards share the core until a's ends at 25 (b has done 2 of its 4), b's ends at 27 and b sleeps 6: 33
    assert simulate_star_step("sft", [1, 2], 4, _unit_costs(), profile, cores=1)["makespan_s"] == pytest.approx(33.0)
    same = Profile(server_gflops=50, devices=(DeviceSpec("a", 50, 1), DeviceSpec("b", 50, 1)),
                   uplink_mbps=1e9, downlink_mbps=1e9, latency_ms=0)
    # equal speeds: the timeline is 2 + 15 + 4 = 21, and one shared core needs the 24
    assert simulate_star_step("sft", [1, 2], 4, _unit_costs(), same)["makespan_s"] == pytest.approx(21.0, rel=1e-6)
    assert simulate_star_step("sft", [1, 2], 4, _unit_costs(), same, cores=1)["makespan_s"] == pytest.approx(24.0)



def test_star_step_actions_mirror_the_server():
    from ringada import schedule as sched
    from ringada.sim import star_step_actions

    def text(acts):
        return " ".join(str(a) for a in acts)

    sfl = star_step_actions("sfl", [2, 1], 2)
    assert text(sfl[0]) == "rF5.0<2 F5.0 B5.0 sB5.0>2 rF3.0<1 F3.0 B3.0 sB3.0>1"
    assert [text(acts) for acts in sfl[1:]] == ["F2.0 sF2.0>0 rB2.0<0 B2.0", "F4.0 sF4.0>0 rB4.0<0 B4.0"]
    sft = star_step_actions("sft", [1, 2], 2)
    assert text(sft[0]) == "rF3.0<1 rF5.0<2 F3.0 B3.0 F5.0 B5.0 sB3.0>1 sB5.0>2" and sft[1:] == sfl[1:]
    for mode in ("sfl", "sft"):  # every send has its receive and the lists run to the end
        assert sched.simulate_shared(star_step_actions(mode, [3, 1, 2], 3), lambda a: 1.0)["makespan"] > 0
    two = star_step_actions("sfl", [2, 1], 2, steps=2)  # a round of 2 local steps: the micro-batch is the step
    assert text(two[1]) == "F2.0 sF2.0>0 rB2.0<0 B2.0 F2.1 sF2.1>0 rB2.1<0 B2.1" and two[0][:8] == sfl[0]
    # device 1 forwards 1 s, backward 1 s, the server takes 1 s for each device: device 1 (served last in the
    # first step) starts its second forward while the server serves device 2, so two steps take less than twice
    # one step
    one_step = sched.simulate_shared(sfl, lambda a: 1.0)["makespan"]
    assert one_step == 6.0 and sched.simulate_shared(two, lambda a: 1.0)["makespan"] < 2 * one_step
    with pytest.raises(ValueError, match="expected the device ranks 1..2"):
        star_step_actions("sfl", [0, 1], 2)
    with pytest.raises(ValueError, match="mode"):
        star_step_actions("ring", [1], 1)


def test_star_sfl_step_is_the_schedulers_makespan():
    """With a core per rank and no message cost the simulated sfl step is exactly the scheduling model's
    makespan: release = device forward + uplink, server time, tail = downlink + device backward."""
    import itertools

    from ringada import schedule as sched
    from ringada.comm import HEADER_BYTES
    from ringada.federated.scheduling import makespan
    from ringada.profiles import DeviceSpec, Profile
    from ringada.sim import simulate_star_step, star_step_actions

    dev_f, dev_b, srv_f, srv_b = [1.0, 4.0, 0.5, 2.0], [2.0, 0.5, 3.0, 1.0], [1.5, 0.5, 2.0, 1.0], [1.0, 2.5, 0.5, 3.0]
    up, down = [0.25, 1.0, 0.5, 0.0], [0.5, 0.25, 2.0, 1.0]
    release = [f + u for f, u in zip(dev_f, up)]
    server = [f + b for f, b in zip(srv_f, srv_b)]
    tail = [d + b for d, b in zip(down, dev_b)]

    def cost(a):
        u, own = divmod(a.stage, 2)
        return ((srv_f, srv_b) if own else (dev_f, dev_b))[a.kind == sched.B][u - 1]

    def link(a):
        return (up if a.kind == sched.SEND_F else down)[a.stage // 2 - 1]

    for order in itertools.permutations(range(4)):
        actions = star_step_actions("sfl", [u + 1 for u in order], 4)
        assert sched.simulate_shared(actions, cost, link)["makespan"] == makespan(order, release, server, tail)
    # the same through simulate_star_step, slow devices (their sleep) and links included
    profile = Profile(server_gflops=50, devices=(DeviceSpec("a", 25, 1), DeviceSpec("b", 50, 1),
                                                 DeviceSpec("c", 10, 1)),
                      uplink_mbps=8, downlink_mbps=16, latency_ms=100)
    costs = _unit_costs(act_bytes=1_000_000, head_fwd_s=0.5, head_bwd_s=1.0, embed_s=0.25)
    depths, L, speeds = [1, 3, 2], 5, [0.5, 1.0, 0.2]
    nbytes = costs.act_bytes + HEADER_BYTES
    release = [(0.25 + d) / s + 0.1 + nbytes * 8 / 8e6 for d, s in zip(depths, speeds)]
    server = [(L - d) * 3 + 1.5 for d in depths]
    tail = [0.1 + nbytes * 8 / 16e6 + 2 * d / s for d, s in zip(depths, speeds)]
    for policy in ("fifo", "heuristic", "optimal"):
        step = simulate_star_step("sfl", depths, L, costs, profile, policy)
        order = [u - 1 for u in step["order"]]
        assert step["makespan_s"] == pytest.approx(makespan(order, release, server, tail))
        assert step["fifo_makespan_s"] == pytest.approx(makespan(sorted(range(3), key=lambda u: release[u]), release,
                                                                 server, tail))
    optimal = simulate_star_step("sfl", depths, L, costs, profile, "optimal")
    assert optimal["makespan_s"] <= optimal["fifo_makespan_s"] + 1e-9
    # one shared core can only be slower; message CPU only adds
    assert simulate_star_step("sfl", depths, L, costs, profile, "optimal", cores=1)["makespan_s"] >= \
        optimal["makespan_s"]
    costly = simulate_star_step("sfl", depths, L, costs, profile, "optimal", msg_cost_per_byte=1e-7)
    assert costly["cpu_s"] == pytest.approx(optimal["cpu_s"] + 4 * 3 * nbytes * 1e-7)
    assert costly["makespan_s"] > optimal["makespan_s"]


def test_emulation_delay_arithmetic():
    from ringada.profiles import DeviceSpec, Profile
    from ringada.runtime import emulated_slowdown

    assert emulated_slowdown(0.25) == 3.0 and emulated_slowdown(1.0) == 0.0 and emulated_slowdown(4.0) == 0.0
    with pytest.raises(ValueError, match="speed must be > 0"):
        emulated_slowdown(0)
    profile = Profile(server_gflops=1, devices=(DeviceSpec("a", 25, 1),), uplink_mbps=80, downlink_mbps=8,
                      latency_ms=5, reference_gflops=50)
    assert profile.speed(25) == 0.5
    assert profile.link_seconds(1_000_000) == pytest.approx(0.005 + 8e6 / 80e6)
    assert profile.link_seconds(1_000_000, 8) == pytest.approx(0.005 + 1.0)


def test_memory_budgets_are_checked_against_the_partition(tmp_path, tiny_dirs):
    from ringada.partition import estimate_memory
    from ringada.runtime import make_topology

    sets = [f"model.path={tiny_dirs['llama']}", "pipeline.mode=ring", "data.seq_len=16", "data.batch_size=4",
            "data.micro_batches=2", "pipeline.partition=[1, 1, 1, 1]"]
    need = estimate_memory(load(None, sets), [1, 1, 1, 1])
    assert need[0] > need[1] == need[2] == need[3] > 0  # the initiator adds the embedding and head
    roomy = _profile(tmp_path, [1, 1, 1, 1])
    assert make_topology(load(None, [*sets, f"pipeline.profile={roomy}"]), 0, 4).partition == [1, 1, 1, 1]
    tight = _profile(tmp_path, [1, need[1] / 2 / 2**20, 1, 1])
    with pytest.raises(ConfigError, match=r"rank 1 \(device2\) would need ~0 MiB for 1 blocks but its budget"):
        make_topology(load(None, [*sets, f"pipeline.profile={tight}"]), 0, 4)


def test_emulated_ring_learns_exactly_what_the_plain_ring_learns(pool2, tmp_path, tiny_dirs, token_jsonl):
    """Emulation only stretches time: the adapters equal the reference's."""
    from tests.test_ring import _cfg, _check_against_reference

    raw = _cfg(tmp_path / "out", tiny_dirs["llama"], token_jsonl, partition=[2, 2], micro=2, steps=3)
    raw["pipeline"].update({"profile": _profile(tmp_path, [100, 100], gflops=(50, 25)), "emulate": True})
    pool2.run(raw)
    summary, _, _ = _check_against_reference(raw, tiny_dirs["llama"], token_jsonl)
    assert summary["ranks"][1]["fwd_s"] > 0


def test_waiting_in_the_steps_sums_counts_as_waiting(pool2, tmp_path, tiny_dirs, token_jsonl):
    """A line whose rank 0 holds one frozen block and a slow rank 1 holds the rest: rank 0 receives nothing in a
    training step and spends it waiting for rank 1 to take its activations and then in the step's sum, which
    its wait_s shows (it showed neither)."""
    from tests.test_ring import _cfg

    raw = _cfg(tmp_path / "out", tiny_dirs["llama"], token_jsonl, mode="line", partition=[1, 3], micro=2, steps=3,
               unfreeze={"initial": 1, "every": 100})
    raw["pipeline"].update({"profile": _profile(tmp_path, [100, 100], gflops=(50, 2.5)), "emulate": True})
    pool2.run(raw)
    ranks = json.loads((tmp_path / "out" / "summary.json").read_text())["ranks"]
    slow = ranks[1]["fwd_s"] + ranks[1]["bwd_s"]  # its compute, stretched 20 times
    assert ranks[0]["wait_s"] > 0.8 * slow > 10 * (ranks[0]["fwd_s"] + ranks[0]["bwd_s"])


def test_bench_systems_share_settings_and_differ_only_where_named():
    from ringada.bench import RING_SYSTEMS, STAR_SYSTEMS, markdown_table, reference_of, resolved_settings, run_bench

    base = {"run.steps": 5, "data.batch_size": 8}
    settings = {name: resolved_settings(name, base, 30, 4) for name in RING_SYSTEMS + STAR_SYSTEMS}
    assert settings["ring-earlystop"][1]["unfreeze.initial"] == 8  # top 25% of 30 blocks (rounded)
    assert "unfreeze.initial" not in settings["ring-full"][1] and "unfreeze.initial" not in settings["tdp-1f1b-full"][1]
    assert settings["ring-noearlystop"][1]["pipeline.early_stop"] is False
    assert settings["ring-noearlystop"][1]["unfreeze.initial"] == 8
    for name, same in (("ring-nolookahead", "ring-earlystop"), ("line-nolookahead", "line")):  # lookahead ablations
        own = {k: v for k, v in settings[name][1].items() if k != "pipeline.lookahead"}
        assert settings[name][1]["pipeline.lookahead"] is False and own == settings[same][1]
    assert settings["tdp-1f1b"][1]["unfreeze.initial"] == 8 and settings["tdp-gpipe"][1]["pipeline.schedule"] == "gpipe"
    assert settings["single"][2] == 1 and all(settings[s][2] == 4 for s in RING_SYSTEMS if s != "single")
    assert settings["tdp-1f1b"][0] == "ringada.baselines.tdp" and settings["line"][1]["pipeline.mode"] == "line"
    # star: a server plus 4 devices, steps rounded to whole rounds
    assert settings["sfl"][2] == 5 and settings["sfl"][1]["run.steps"] == 4 and settings["sfl"][1]["star.local_steps"] == 2
    # every distributed ring system is compared with tdp 1F1B training the same blocks
    assert [reference_of(s) for s in ("ring-earlystop", "ring-full", "line", "sfl")] == \
        ["tdp-1f1b", "tdp-1f1b-full", "tdp-1f1b", None]
    row = {"system": "x", "trainable": "all", "tokens_per_s": 10.0, "vs_tdp_1f1b_same_trainable": 1.5,
           "step_s": 2.0, "predicted_step_s": 1.0, "measured_over_predicted": 2.0, "train_cpu_s_per_step": 3.25,
           "peak_rss_bytes": 2**30, "peak_rss_bytes_per_rank": [2**30, 2**29], "bytes_sent": 3e6, "eval_loss": None}
    table = markdown_table({"results": [row], "machine": {"cpus": 2}})
    assert "| x | all | 10.0 | 1.50 | 2.00 | 1024 / 512 | 3.0 | - |" in table
    assert "| x | 2.00 | 1.00 | 2.00 | +100% | - | 3.25 | - |" in table and "(2 shared cores)" in table
    assert "CPU / model" not in table  # no floor figures, no table of them
    row.update(model_cpu_s_per_step=3.0, cpu_over_model=3.25 / 3.0, cpu_utilization=0.8, floor_step_s=1.6,
               step_over_floor=2.0 / 1.6)
    assert "| x | 3.25 | 3.00 | 1.08 | 80% | 1.60 | 1.25 |" in markdown_table({"results": [row], "machine": {"cpus": 2}})
    with pytest.raises(ValueError, match="--repeats: got 0; expected >= 1"):
        run_bench("ring", Path("unused"), True, 0, 4)


def test_compression_sweep_savings_changes_and_pareto_front():
    from ringada.bench import COMPRESS_SYSTEMS, compression_sweep, resolved_settings, sweep_table

    sets = {s: resolved_settings(s, {"run.steps": 4, "data.batch_size": 8}, 30, 4)[1] for s in COMPRESS_SYSTEMS}
    assert sets["sft-uncompressed"]["pipeline.mode"] == "sft" and sets["sft-uncompressed"]["star.device_blocks"] == \
        [2, 4, 6, 8]
    assert not any(k.startswith("compress.") for k in sets["sft-uncompressed"])
    # every setting runs the same star, only the compress section differs
    for s in COMPRESS_SYSTEMS:
        assert {k: v for k, v in sets[s].items() if not k.startswith("compress.")} == sets["sft-uncompressed"]

    def row(name, nbytes, exact, codec):
        return {"system": f"sft-{name}", "smashed_bytes": nbytes, "eval_loss_exact": exact, "eval_loss_codec": codec}

    bench = {"results": [row("uncompressed", 100.0, 4.0, 4.0), row("int8", 30.0, 4.0, 4.01),
                         row("int4", 15.0, 4.02, 4.1), row("topk", 20.0, 7.4, 7.5)]}
    compression_sweep(bench)
    r = {x["system"]: x for x in bench["results"]}
    assert r["sft-int4"]["smashed_saving"] == pytest.approx(0.85)
    assert r["sft-int4"]["eval_loss_exact_change"] == pytest.approx(0.005)
    assert r["sft-int8"]["eval_loss_codec_change"] == pytest.approx(0.0025)
    assert [x["pareto"] for x in bench["results"]] == [False, True, True, False]  # topk: more bytes, worse loss
    assert "| int4 | 0.00 | 85.0% | 4.0200 | +0.50% | 4.1000 | +2.50% | yes |" in sweep_table(bench)


def test_time_to_target_reads_curves_and_maps_tdp_onto_the_exact_systems(tmp_path):
    import json as _json

    from ringada.bench import TTA_SYSTEMS, eval_curve, resolved_settings, time_to_target, tta_table

    sets = {s: resolved_settings(s, {"run.steps": 16, "data.batch_size": 8}, 30, 4) for s in TTA_SYSTEMS}
    assert sets["ring-plateau"][1]["unfreeze.by"] == "plateau" and sets["ring-plateau"][1]["unfreeze.initial"] == 8
    assert all("unfreeze.initial" not in sets[s][1] for s in ("ring-full", "line-full", "single-full", "tdp-1f1b-full"))
    # a run's curve: the evaluation before, every eval_every step (metrics.jsonl), and after
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(_json.dumps(m) + "\n" for m in [
        {"step": 0, "elapsed_s": 1.0, "tokens": 100}, {"step": 1, "elapsed_s": 2.0, "tokens": 200, "eval_loss": 4.5},
        {"step": 2, "elapsed_s": 3.0, "tokens": 300}, {"step": 3, "elapsed_s": 4.0, "tokens": 400}]))
    summary = {"steps": 4, "tokens": 400, "train_s": 4.0, "eval_before": {"eval_loss": 5.0},
               "eval_after": {"eval_loss": 4.0}}
    single = eval_curve(out, summary)
    assert [(p["step"], p["tokens"], p["train_s"], p["eval_loss"]) for p in single] == [
        (0, 0, 0.0, 5.0), (2, 200, 2.0, 4.5), (4, 400, 4.0, 4.0)]
    tdp = eval_curve(out, {"step_elapsed_s": [0.5, 1.0, 1.5, 2.0]})
    results = [{"system": "single-full", "curve": single}, {"system": "tdp-1f1b-full", "curve": tdp},
               {"system": "sft", "curve": [{"step": 0, "tokens": 0, "train_s": 0.0, "eval_loss": 5.0},
                                           {"step": 1, "tokens": 400, "train_s": 9.0, "eval_loss": 4.7}]}]
    target = time_to_target(results, None)
    assert target["loss"] == pytest.approx(5.0 + 0.9 * (4.0 - 5.0)) and target["start_loss"] == 5.0
    by = {r["system"]: r for r in results}
    assert by["single-full"]["time_to_target_s"] == 4.0 and by["single-full"]["tokens_to_target"] == 400
    # tdp trains what single trains: single's loss at each step, tdp's own time for it
    assert by["tdp-1f1b-full"]["steps_to_target"] == 4 and by["tdp-1f1b-full"]["time_to_target_s"] == 2.0
    assert by["sft"]["time_to_target_s"] is None and by["sft"]["final_eval_loss"] == 4.7
    assert time_to_target([dict(r, curve=list(r["curve"])) for r in results[:1]], 4.5)["loss"] == 4.5
    with pytest.raises(ValueError, match="--target"):
        time_to_target([{"system": "sft", "curve": []}], None)
    for r in results:
        r.update(ranks=1, peak_rss_bytes_per_rank=[2**20], bytes_sent=0)
    assert "| tdp-1f1b-full | 1 | 2.0 | 400 | 4 | 4.0000 | 1 | 0.0 |" in tta_table({"results": results,
                                                                                     "target": target})


def test_star_figures_set_the_sfl_server_against_copies_and_fifo_and_the_breakdown_reads_rank_rows():
    from ringada.bench import breakdown_table, resolved_settings, star_figures, star_figures_table

    # star suite systems under a profile: emulated star, fifo as the order's baseline, depths from --set
    _, sets, procs = resolved_settings("sfl-fifo", {"run.steps": 8, "star.device_blocks": [8, 6, 4, 2],
                                                    "star.rounds": 8}, 30, 4, "configs/profiles/edge4.yaml")
    assert (sets["star.rounds"], sets["star.local_steps"]) == (8, 1)  # --set star.rounds: a round per step
    assert (sets["star.schedule"], sets["star.emulate"], sets["star.profile"], procs) == (
        "fifo", True, "configs/profiles/edge4.yaml", 5)
    assert sets["star.device_blocks"] == [8, 6, 4, 2] and "pipeline.emulate" not in sets
    with pytest.raises(ValueError, match="sfl-copy-per-device cannot be emulated"):
        resolved_settings("sfl-copy-per-device", {"run.steps": 8}, 30, 4, "configs/profiles/edge4.yaml")
    sfl = {"system": "sfl", "ranks": 9, "server_held_bytes": 100, "server_peak_rss_bytes": 400,
           "server_step_s": 7.0, "trained_step_s": 8.0, "step_s": 9.5, "makespan_vs_fifo": 0.9}
    by = {"sfl": sfl, "sfl-copy-per-device": {"server_held_bytes": 600, "server_peak_rss_bytes": 1000},
          "sfl-fifo": {"server_step_s": 7.0, "trained_step_s": 10.0, "step_s": 10.0}}
    figures = star_figures(by)
    assert figures["server_memory"]["devices"] == 8
    assert figures["server_memory"]["held_ratio"] == pytest.approx(1 / 6)
    assert figures["server_memory"]["peak_rss_ratio"] == pytest.approx(0.4)
    # until the last device's backward is done, and the wall time per step (round ends included) beside it
    assert figures["order_vs_fifo"]["measured_ratio"] == pytest.approx(0.8)
    assert figures["order_vs_fifo"]["wall_ratio"] == pytest.approx(0.95)
    assert "| sfl | 8.00 | 10.00 | 0.800 | 0.900 | 9.50 | 10.00 | 0.950 |" in star_figures_table(
        {"star_figures": figures})
    assert star_figures({"sfl": sfl}) == {}
    rows = [{"rank": 0, "fwd_s": 2.0, "bwd_s": 4.0, "wait_s": 1.0, "train_cpu_s": 7.0},
            {"rank": 1, "fwd_s": 1.0, "bwd_s": 0.0, "wait_s": 6.0, "train_cpu_s": None}]
    table = breakdown_table([{"system": "ring", "rank_rows": rows, "steps": 2}])
    assert "| ring | r0 1.00 / 2.00 / 0.50 / 0.50; r1 0.50 / 0.00 / 3.00 / - |" in table
    assert "r0 1.00 / 2.00 / 0.50 / -;" in breakdown_table([{"system": "ring", "rank_rows": rows, "steps": 2}],
                                                           emulated=True)


def test_star_step_real_devices_recompute_and_the_servers_own_time():
    from ringada.profiles import DeviceSpec, Profile
    from ringada.sim import simulate_star_step

    # one device at twice this machine's speed, a server at this machine's: L = 4 blocks, the device holds 1
    profile = Profile(server_gflops=50, devices=(DeviceSpec("fast", 100, 1),), uplink_mbps=1e9, downlink_mbps=1e9,
                      latency_ms=0)
    emulated = simulate_star_step("sfl", [1], 4, _unit_costs(), profile)
    real = simulate_star_step("sfl", [1], 4, _unit_costs(), profile, emulated=False)
    # emulated: a faster device cannot be emulated (speed 1): 1 + 3 * 3 + 2 = 12; real: 0.5 + 9 + 1 = 10.5
    assert emulated["makespan_s"] == pytest.approx(12.0) and real["makespan_s"] == pytest.approx(10.5)
    # the server's own time ends with its gradient send, before the device's backward
    assert emulated["server_s"] == pytest.approx(10.0)
    # star.recompute: the server's backward runs its 3 blocks' forward again
    assert simulate_star_step("sfl", [1], 4, _unit_costs(), profile, recompute=True)["makespan_s"] == \
        pytest.approx(15.0)
    # real devices share the uplink: 2 devices, 1 MB each over 8 Mbit/s take 2 s instead of 1
    two = Profile(server_gflops=50, devices=(DeviceSpec("a", 50, 1), DeviceSpec("b", 50, 1)), uplink_mbps=8,
                  downlink_mbps=1e9, latency_ms=0)
    costs = _unit_costs(block_fwd_s=0.0, block_bwd_s=0.0, act_bytes=1_000_000)
    assert simulate_star_step("sft", [1, 1], 2, costs, two, emulated=False)["makespan_s"] == \
        pytest.approx(2 * (1_000_000 + 64) * 8 / 8e6, rel=1e-3)


def test_the_tta_suite_emulates_ring_and_star_systems_and_needs_a_target_under_a_profile(tmp_path):
    from ringada.bench import resolved_settings, run_bench

    _, sets, _ = resolved_settings("ring-plateau", {"run.steps": 8}, 30, 4, "configs/profiles/ring4.yaml")
    assert (sets["pipeline.emulate"], sets["pipeline.partition"]) == (True, "capacity")
    _, sets, procs = resolved_settings("sft", {"run.steps": 8}, 30, 4, "configs/profiles/edge4.yaml")
    assert (sets["star.emulate"], sets["star.profile"], procs) == (True, "configs/profiles/edge4.yaml", 5)
    with pytest.raises(ValueError, match="single-full cannot be emulated"):
        resolved_settings("single-full", {"run.steps": 8}, 30, 4, "configs/profiles/ring4.yaml")
    # the default target is single-full's, which does not run here: refused before anything starts
    with pytest.raises(ValueError, match="--target"):
        run_bench("tta", tmp_path / "out", smoke=True, repeats=1, world=4, profile="configs/profiles/ring4.yaml")
    assert not (tmp_path / "out").exists()


def test_simulated_lookahead_by_hand():
    """line [1, 1], gpipe, 2 micro-batches, the top block trainable, two steps. Step 1: r0 F F [0, 2]; r1 F F B B
    ends at 7. Rank 0 then runs step 2's two stage-0 forwards in [2, 4], inside the step, so step 2 starts with
    them done and ends at 6 (r1: F F B B). Without lookahead both steps take 7. The CPU seconds are the same."""
    from ringada.sim import simulate_pipeline

    extra = {"unfreeze.initial": 1, "unfreeze.every": 10, "run.steps": 2}
    on = simulate_pipeline(_line_cfg(**extra), [1, 1], _unit_costs())
    off = simulate_pipeline(_line_cfg(**extra, **{"pipeline.lookahead": "false"}), [1, 1], _unit_costs())
    assert on["step_s_each"] == pytest.approx([7.0, 6.0]) and off["step_s_each"] == pytest.approx([7.0, 7.0])
    assert on["cpu_s_per_step"] == off["cpu_s_per_step"]
    # a plateau check after every step may move the frontier: the runtime does not look ahead, nor does the model
    plateau = {**extra, "unfreeze.by": "plateau", "unfreeze.every": 1, "data.eval": "null"}
    assert simulate_pipeline(_line_cfg(**plateau), [1, 1], _unit_costs())["step_s_each"] == pytest.approx([7.0, 7.0])
    # the check evaluates inside its step: each eval batch is a forward-only plan, r0 F F [0, 2], r1 F F [1, 3]
    evaluated = simulate_pipeline(_line_cfg(**{**plateau, "data.eval": "shakespeare", "run.eval_batches": 2}),
                                  [1, 1], _unit_costs())
    assert evaluated["step_s_each"] == pytest.approx([7.0 + 2 * 3.0, 7.0 + 2 * 3.0])
    assert [r["fwd_s"] for r in evaluated["ranks"]] == [2 * (2.0 + 2 * 2.0)] * 2  # per step: 2 training, 2 × 2 eval
    # a frontier that followed the run's losses is simulated along the path the run recorded
    path = {**plateau, "unfreeze.every": 10}
    recorded = simulate_pipeline(_line_cfg(**path), [1, 1], _unit_costs(), trainable=[1, 2])["step_s_each"]
    assert recorded == simulate_pipeline(_line_cfg(**{**extra, "unfreeze.every": 1}), [1, 1],
                                         _unit_costs())["step_s_each"]
    assert recorded != simulate_pipeline(_line_cfg(**path), [1, 1], _unit_costs())["step_s_each"]
    with pytest.raises(ValueError, match="trainable"):
        simulate_pipeline(_line_cfg(**path), [1, 1], _unit_costs(), trainable=[1])
    # stage 0 trainable (no early stop): its next forward needs this step's update and a graph, so no lookahead
    full = {**extra, "pipeline.early_stop": "false"}
    assert simulate_pipeline(_line_cfg(**full), [1, 1], _unit_costs())["step_s_each"] == \
        simulate_pipeline(_line_cfg(**full, **{"pipeline.lookahead": "false"}), [1, 1], _unit_costs())["step_s_each"]


def test_simulated_lookahead_runs_chunks_and_the_next_step_continues():
    """line [4, 2], gpipe, 2 micro-batches, the top block trainable, two steps; the lookahead runs a quarter of
    stage 0 (one block) at a time. Step 1: r0 F F [0, 8]; r1 F [4, 6], F [8, 10], B B [10, 14]. From 8, rank 0
    runs six one-block chunks until the step ends at 14: step 2's mb 0 whole, and half of mb 1. Step 2: r0 runs
    mb 1's last two blocks [0, 2]; r1 F [0, 2], F [2, 4], B B [4, 8]. A micro-batch at a time, the lookahead would
    have run mb 1 whole, to 16, past the step's end."""
    from ringada.sim import simulate_pipeline

    extra = {"unfreeze.initial": 1, "unfreeze.every": 10, "run.steps": 2}
    on = simulate_pipeline(_line_cfg(**extra), [4, 2], _unit_costs())
    off = simulate_pipeline(_line_cfg(**extra, **{"pipeline.lookahead": "false"}), [4, 2], _unit_costs())
    assert on["step_s_each"] == pytest.approx([14.0, 8.0]) and off["step_s_each"] == pytest.approx([14.0, 14.0])
    assert on["cpu_s_per_step"] == off["cpu_s_per_step"]


def test_step_floor_is_compute_over_cores_or_one_micro_batch_alone(tiny_dirs):
    """The floor of a step: its modelled compute over the cores its ranks can use, or, where cores are plenty,
    the critical path (one micro-batch through every stage), which is shorter than the whole step's compute."""
    from ringada.bench import step_floor

    settings = {"model.path": str(tiny_dirs["llama"]), "data.train": "x.jsonl", "data.seq_len": 16,
                "data.batch_size": 8, "data.micro_batches": 4, "run.steps": 2}
    one_core = step_floor("line", settings, 2, 4, cores=1)
    plenty = step_floor("line", settings, 2, 4, cores=64)
    assert one_core["floor_s"] == pytest.approx(one_core["model_cpu_s"])  # two ranks on one core
    assert plenty["model_cpu_s"] == one_core["model_cpu_s"]
    assert one_core["model_cpu_s"] / 2 <= plenty["floor_s"] < one_core["model_cpu_s"]
    assert step_floor("sfl", settings, 2, 4, cores=2) is None and step_floor("tdp-1f1b", settings, 2, 4, 2) is None


def test_predicted_run_groups_steps_by_trainable_set():
    """A run's predicted training, as `fastest` compares splits: each trainable set's steps as first, middle and
    last step. Where every middle step is alike (the lookahead both ways) that is the whole run's simulation."""
    from ringada.sim import predicted_run_s, simulate_pipeline

    for extra in ({"unfreeze.initial": 1, "unfreeze.every": 100, "run.steps": 6},  # one set: F F, then lookahead
                  {"unfreeze.initial": 1, "unfreeze.every": 4, "run.steps": 7}):  # 4 steps of the top block, 3 of both
        cfg = _line_cfg(**extra, **{"data.eval": "null"})
        assert predicted_run_s(cfg, [1, 1], _unit_costs()) == pytest.approx(
            simulate_pipeline(cfg, [1, 1], _unit_costs())["wall_s"])


def test_fastest_partition_is_the_best_predicted_split(tiny_dirs):
    """`fastest`: for two ranks, the split with the shortest predicted training among all of them, from the costs
    measured on this machine; the runtime's topology takes it."""
    from ringada.costs import block_costs
    from ringada.partition import plan_fastest
    from ringada.runtime import make_topology
    from ringada.sim import predicted_run_s

    for mode in ("ring", "line"):
        cfg = load(None, [f"model.path={tiny_dirs['llama']}", f"pipeline.mode={mode}", "pipeline.partition=fastest",
                          "data.seq_len=16", "data.batch_size=4", "data.micro_batches=2", "data.train=x.jsonl",
                          "unfreeze.initial=1", "unfreeze.every=2", "run.steps=8"])
        partition, details = plan_fastest(cfg, 2)
        costs = block_costs(cfg, 2)
        splits = [[a, 4 - a] for a in range(0 if mode == "ring" else 1, 4)]
        best = min(predicted_run_s(cfg, s, costs) for s in splits)
        assert details["predicted_s"] == pytest.approx(best) and sum(partition) == 4
        assert predicted_run_s(cfg, partition, costs) == pytest.approx(best)
        assert details["predicted_s"] <= details["start_s"]
        assert make_topology(cfg, 0, 2).partition == partition
    with pytest.raises(ConfigError, match="pipeline.partition: got 'fastest'; pipeline.mode=single"):
        load(None, ["pipeline.partition=fastest"])
