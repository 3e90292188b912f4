"""Star links as data: the plans both ends derive, their checks, and a link that refuses to leave its plan."""

from __future__ import annotations

import pytest
import torch

from ringada import compress as Z
from ringada.compress import Codec, LinkCodecs, decode, encode
from ringada.config import load
from ringada.star import (DOWN, UP, Link, Msg, ProtocolError, StarTopology, check_plan, eval_links, eval_plan,
                          format_plan, round_plan, smashed_summary, start_plan, stop_plan)


@pytest.mark.parametrize("privacy", [False, True])
def test_round_plan_is_every_step_in_causal_order_then_the_round_end(privacy):
    plan = round_plan(3, 2, 4, privacy)
    check_plan(plan)
    exchange = ["activation", "top", "top_gradient", "gradient"] if privacy else ["activation", "labels", "gradient"]
    assert [m.name for m in plan] == ["command", *exchange, *exchange, "device_state", "global"]
    assert [m.step for m in plan[1:-2]] == [12] * len(exchange) + [13] * len(exchange)  # round 3 of 4 steps
    ups = {"activation", "labels", "top_gradient", "device_state"}
    assert all(m.direction == (UP if m.name in ups else DOWN) for m in plan)


def test_a_device_not_selected_only_hears_the_command_and_the_global_adapter():
    assert round_plan(5, 0, 2, False) == [Msg("command", 5), Msg("global", 5)]


def test_eval_start_and_stop_plans():
    assert [m.name for m in eval_plan(True, 2, False)] == ["command", "activation", "labels", "activation", "labels",
                                                          "eval_stats"]
    assert [m.step for m in eval_plan(True, 2, True)][1:5] == [-1, -1, -2, -2]
    assert eval_plan(False, 2, False) == [Msg("command", -1)]
    assert [m.name for m in start_plan(True)] == ["status", "hello", "view", "restore"]
    assert format_plan(stop_plan()) == "vcommand@-2 ^row@-2"


@pytest.mark.parametrize("plan, error", [
    ([Msg("gradient", 0), Msg("activation", 0)], "comes after gradient"),
    ([Msg("activation", 0), Msg("labels", 0)], "incomplete exchange"),
    ([Msg("activation", 0), Msg("gradient", 0), Msg("labels", 0)], "comes after gradient"),
    ([Msg("beacon", 0)], "unknown name"),
])
def test_check_plan_rejects_broken_exchanges(plan, error):
    with pytest.raises(ValueError, match=error):
        check_plan(plan)


class _Wire:
    """Records what would go on the wire; answers receives from a queue."""

    device = torch.device("cpu")

    def __init__(self, answers=()):
        self.sent, self.answers = [], list(answers)

    def send(self, dst, kind, step, mb, tensors):
        self.sent.append((dst, kind, step, mb, [t.clone() for t in tensors]))

    def recv(self, src, kind, step, mb):
        return self.answers.pop(0)


def test_a_link_follows_its_plan_and_refuses_anything_else():
    wire = _Wire(answers=[[torch.ones(2, 3), torch.zeros(2)]])
    device = Link(rank=2, peer=0, wire=wire, codecs=Codec(), seed=0, at_server=False)
    device.follow(round_plan(0, 1, 1, False))
    with pytest.raises(ProtocolError, match=r"the plan says vcommand@0, not \^activation@0"):
        device.send("activation", 0, [torch.ones(1)])
    device.plan.appendleft(Msg("command", 0))
    assert device.recv("command", 0)[0].shape == (2, 3)
    device.send("activation", 0, [torch.ones(2, 4), torch.zeros(2)])
    assert wire.sent[0][:4] == (0, 1, 0, 0)  # to the server, an activation of step 0, micro-batch code 0
    with pytest.raises(ProtocolError, match="the plan says"):
        device.recv("gradient", 0)  # labels come first


def test_smashed_messages_go_through_the_codec_and_the_rest_does_not():
    wire = _Wire()
    server = Link(rank=0, peer=1, wire=wire, codecs=Codec(bits=8, lossless="zlib"), seed=0, at_server=True)
    server.follow([Msg("top", 7), Msg("global", 0)])
    server.send("top", 7, [torch.randn(2, 4, 8)])
    server.send("global", 0, [torch.randn(3)])
    assert wire.sent[0][4][0].dtype == torch.uint8 and wire.sent[1][4][0].dtype == torch.float32
    assert Msg("top", 7).direction == DOWN


CODECS = LinkCodecs(activation=Codec(bits=8, scale="group", group=4, rounding="nearest"),
                    gradient=Codec(topk=0.5, bits=2, scale="token"), error_feedback=True)


def test_each_direction_has_its_own_codec_and_gradients_their_error_feedback():
    wire = _Wire()
    server = Link(rank=0, peer=1, wire=wire, codecs=CODECS, seed=3, at_server=True)
    server.follow([Msg("top", 4), Msg("gradient", 4), Msg("gradient", 5)])
    top, grads = torch.randn(2, 3, 8), [torch.randn(2, 3, 8), torch.randn(2, 3, 8)]
    server.send("top", 4, [top])
    server.send("gradient", 4, [grads[0], torch.zeros(1)])
    sent_top, sent_grad = wire.sent[0][4][0], wire.sent[1][4][0]
    assert Z.read_header(sent_top).codec == CODECS.activation  # the top hidden state is an activation
    assert Z.read_header(sent_grad).codec == CODECS.gradient
    assert "top" not in server.smash.feedback.residuals  # error feedback is for gradients only
    torch.testing.assert_close(server.smash.feedback.residuals["gradient"], grads[0] - decode(sent_grad))
    residual = server.smash.feedback.residuals["gradient"].clone()
    server.send("gradient", 5, [grads[1], torch.zeros(1)])
    assert not torch.equal(decode(wire.sent[2][4][0]), decode(encode(grads[1], CODECS.gradient)))
    torch.testing.assert_close(server.smash.feedback.residuals["gradient"],
                               grads[1] + residual - decode(wire.sent[2][4][0]))
    # the bytes of the smashed tensors, before and as they travelled
    assert server.smashed["gradient"] == [2, 2 * 48 * 4, wire.sent[1][4][0].numel() + wire.sent[2][4][0].numel()]
    summary = smashed_summary([server])
    assert summary["raw_bytes"] == 3 * 48 * 4 and summary["ratio"] == summary["coded_bytes"] / (3 * 48 * 4)
    assert summary["by_message"]["top"] == {"messages": 1, "raw_bytes": 48 * 4, "coded_bytes": sent_top.numel()}


def test_evaluations_travel_exactly_unless_asked_and_non_finite_tensors_bypass_the_codec():
    wire = _Wire()
    device = Link(rank=1, peer=0, wire=wire, codecs=CODECS, seed=0, at_server=False)
    device.follow([Msg("activation", -1), Msg("activation", -1), Msg("activation", 2)])
    x = torch.randn(2, 8)
    device.send("activation", -1, [x, torch.zeros(2)])
    device.eval_codec = True
    device.send("activation", -1, [x, torch.zeros(2)])
    device.send("activation", 2, [torch.tensor([[1.0, float("nan")]]), torch.zeros(2)])
    assert torch.equal(wire.sent[0][4][0], x) and wire.sent[1][4][0].dtype == torch.uint8
    assert wire.sent[2][4][0].dtype == torch.float32  # the server must see the NaN to skip the step
    assert device.smashed == {"activation": [1, 8, 8]}  # training steps only


def test_a_received_blob_decodes_to_the_link_dtype_and_is_counted():
    x = torch.randn(2, 3, 8)
    blob = encode(x, CODECS.activation)
    server = Link(rank=0, peer=1, wire=_Wire(answers=[[blob, torch.zeros(2)]]), codecs=CODECS, seed=0,
                  at_server=True, dtype=torch.bfloat16)
    server.follow([Msg("activation", 0)])
    got = server.recv("activation", 0)[0]
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert server.smashed["activation"] == [1, 48 * 2, blob.numel()]


@pytest.mark.parametrize("settings, links", [
    ([], ["exact"]),
    (["compress.lossless=zlib"], ["exact"]),  # lossless: one pass tells it all
    (["compress.bits=4"], ["exact", "codec"]),
    (["compress.topk=0.5", "compress.eval=codec"], ["codec", "exact"]),
])
def test_an_evaluation_goes_through_the_exact_link_and_through_a_lossy_codec(settings, links):
    cfg = load(None, ["run.steps=1", "pipeline.mode=sft", *settings])
    assert eval_links(cfg, StarTopology(rank=0, world_size=3, num_blocks=4, depths=[1, 1])) == links


def test_star_emulation_takes_speeds_and_links_from_the_profile_and_refuses_a_profile_of_other_devices():
    from ringada.config import ConfigError
    from ringada.star import emulated_links, emulated_speed

    cfg = load(None, ["pipeline.mode=sfl", "run.steps=1", "star.profile=configs/profiles/edge4.yaml",
                      "star.emulate=true"])
    # edge4: reference 50 GFLOPS; phone-low 4 (12.5x slower), the vehicle 40; the server (200) cannot be sped up
    assert emulated_speed(cfg, 1) == pytest.approx(50 / 4 - 1)
    assert emulated_speed(cfg, 4) == pytest.approx(50 / 40 - 1)
    assert emulated_speed(cfg, 0) == 0.0
    up, down = emulated_links(cfg, 4)
    assert up(1_000_000) == pytest.approx(0.005 + 8e6 / 100e6)  # 5 ms + 1 MB over the 100 Mbit/s uplink
    assert down(1_000_000) == pytest.approx(0.005 + 8e6 / 300e6)
    with pytest.raises(ConfigError, match=r"star.profile: .*edge4.yaml describes 4 devices but the run has 3"):
        emulated_links(cfg, 3)
    assert emulated_speed(load(None, ["pipeline.mode=sfl", "run.steps=1"]), 1) == 0.0  # not emulating
