"""Star links as data: the plans both ends derive, their checks, and a link that refuses to leave its plan."""

from __future__ import annotations

import pytest
import torch

from ringada.compress import Codec
from ringada.star import (DOWN, UP, Link, Msg, ProtocolError, check_plan, eval_plan, format_plan, round_plan,
                          start_plan, stop_plan)


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

    def __init__(self, answers=()):
        self.sent, self.answers = [], list(answers)

    def send(self, dst, kind, step, mb, tensors):
        self.sent.append((dst, kind, step, mb, [t.clone() for t in tensors]))

    def recv(self, src, kind, step, mb):
        return self.answers.pop(0)


def test_a_link_follows_its_plan_and_refuses_anything_else():
    wire = _Wire(answers=[[torch.ones(2, 3), torch.zeros(2)]])
    device = Link(rank=2, peer=0, wire=wire, codec=Codec(), seed=0, at_server=False)
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
    server = Link(rank=0, peer=1, wire=wire, codec=Codec(bits=8, lossless="zlib"), seed=0, at_server=True)
    server.follow([Msg("top", 7), Msg("global", 0)])
    server.send("top", 7, [torch.randn(2, 4, 8)])
    server.send("global", 0, [torch.randn(3)])
    assert wire.sent[0][4][0].dtype == torch.uint8 and wire.sent[1][4][0].dtype == torch.float32
    assert Msg("top", 7).direction == DOWN
