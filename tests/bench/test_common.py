"""bench/_common.py's comparison helpers, which every multi-launch benchmark (step_time, train_loop) shares."""

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from _common import alternating, keep_lowest, quantile, spread  # noqa: E402


def test_alternating_reverses_the_order_every_other_repeat():
    assert alternating(["a", "b", "c"], 3) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c"),
    ]  # fmt: skip


def test_keep_lowest_keeps_each_names_fastest_repeat():
    best = {}
    for name, median in (("a", 2.0), ("b", 1.0), ("a", 1.5), ("b", 3.0)):
        keep_lowest(best, name, {"median_step_s": median})
    assert best == {"a": {"median_step_s": 1.5}, "b": {"median_step_s": 1.0}}


def test_spread_and_quantile():
    assert spread([1.1, 1.3, 1.2]) == {"median": 1.2, "min": 1.1, "max": 1.3, "repeats": 3}
    assert quantile([5.0, 1.0, 3.0, 2.0, 4.0], 0.9) == 5.0 and quantile([5.0, 1.0, 3.0], 0.5) == 3.0
