"""The unfreezing schedule as DESIGN.md defines it, for steps, epochs and plateaus."""

import pytest

from ringada.config import UnfreezeConfig
from ringada.train import Unfreezer, trainable_count


def test_by_steps_follows_the_formula():
    cfg = UnfreezeConfig(initial=2, every=3, increment=4)
    assert [trainable_count(cfg, 12, s, 0, 0) for s in range(12)] == [2, 2, 2, 6, 6, 6, 10, 10, 10, 12, 12, 12]
    assert trainable_count(UnfreezeConfig(every=0), 12, 0, 0, 0) == 12


def test_by_epochs_counts_epochs_not_steps():
    cfg = UnfreezeConfig(initial=1, every=2, increment=1, by="epochs")
    assert [trainable_count(cfg, 5, 100, e, 0) for e in range(6)] == [1, 1, 2, 2, 3, 3]


def test_by_plateau_adds_blocks_after_patience_checks_without_improvement():
    u = Unfreezer(UnfreezeConfig(initial=1, every=5, increment=2, by="plateau", patience=2, min_delta=0.1), 8)
    seen = []
    for loss in [3.0, 2.5, 2.45, 2.44, 2.0, 2.0, 1.95, 1.99]:
        u.observe(loss)
        seen.append(u.trainable(step=1000, epoch=50))
    # improvements of > 0.1 reset the count; two stale checks in a row unfreeze two more blocks
    assert seen == [1, 1, 1, 3, 3, 3, 5, 5]
    assert u.frontier(0, 0) == 8 - 5


def test_a_plateau_check_evaluation_serves_the_periodic_and_final_evaluations(tmp_path, tiny_dirs, token_jsonl,
                                                                                monkeypatch):
    """With run.eval_every on the plateau checks' steps, the adapters are evaluated once per check, not twice,
    and the records carry the check's values."""
    import json

    from ringada.config import load
    from ringada.launch import train as run_single
    from ringada.runtime import PipelineTrainer, evaluate_adapter

    calls = []
    evaluate = PipelineTrainer.evaluate
    monkeypatch.setattr(PipelineTrainer, "evaluate", lambda self: calls.append(1) or evaluate(self))
    out = tmp_path / "run"
    cfg = load(None, [f"run.out_dir={out}", "run.steps=6", "run.eval_every=2", "run.eval_batches=1",
                      f"model.path={tiny_dirs['llama']}", f"data.train={token_jsonl}", f"data.eval={token_jsonl}",
                      "data.seq_len=16", "data.batch_size=4", "unfreeze.by=plateau", "unfreeze.every=2",
                      "unfreeze.initial=1", "unfreeze.min_delta=100"])
    run_single(cfg)
    # before training, then the checks after steps 2, 4 and 6, which the periodic and the final evaluation reuse
    assert len(calls) == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["frontier"] for r in records] == [3, 3, 3, 3, 2, 2]  # the second check saw no improvement of 100
    assert [("eval_loss" in r) for r in records] == [False, True, False, True, False, False]
    # the final record is the final adapters' own
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] == pytest.approx(evaluate_adapter(cfg, out / "adapter")["eval_loss"],
                                                               rel=1e-6)
