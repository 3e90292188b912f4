"""The unfreezing schedule as DESIGN.md defines it, for steps, epochs and plateaus."""

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
