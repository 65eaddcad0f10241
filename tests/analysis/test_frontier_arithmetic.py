"""The frontier's arithmetic and the budget's choice, on hand-made points."""

import math

import pytest

from shrink.analysis.frontier import (
    Point,
    choose,
    dominates,
    front,
    mark_front,
    parse_size,
    parse_speed,
    speed_floor,
)
from shrink.core.errors import ShrinkError


def pt(label, mb, p, t, tps=None, drop=0, healed=False, fmt="q4_0"):
    fam = ("pruned-healed" if healed else "pruned") if drop else "dense"
    return Point(
        label=label,
        family=fam,
        drop=drop,
        healed=healed,
        format=fmt,
        bytes=int(mb * 1e6),
        ppl={"P": p, "T": t},
        decode_tps=tps,
    )


def hand_made():
    return [
        pt("dense q8_0", 145, 45.0, 18.9, 60),
        pt("dense q4_k_m", 105, 46.2, 19.5, 80),
        pt("dense iq4_nl", 92, 47.9, 20.4, 95),
        pt("dense q2_k", 88, 50.0, 21.8, 90),
        pt("drop 3 healed iq4_nl", 84, 49.0, 21.0, 105, drop=3, healed=True),
        pt("drop 3 iq4_nl", 84, 55.0, 25.0, 105, drop=3),
        pt("drop 9 healed q2_k", 66, 70.0, 30.0, 130, drop=9, healed=True),
    ]


def test_dominance_needs_every_domain():
    a, b = pt("a", 90, 40, 20), pt("b", 100, 41, 19)
    assert not dominates(a, b) and not dominates(b, a)  # each wins one domain
    c = pt("c", 90, 40, 19)
    assert dominates(c, b) and dominates(c, a)
    assert not dominates(c, c)  # equal is not better
    # speed axis: faster and no worse
    assert dominates(pt("f", 200, 40, 19, tps=100), pt("s", 100, 40, 19, tps=50), "speed")


def test_front_marks_each_dominated_point_with_a_dominator():
    points = mark_front(hand_made())
    by = {p.label: p for p in points}
    # the unhealed drop-3 file is beaten by its healed twin at the same size
    assert by["drop 3 iq4_nl"].dominated_by["bytes"] == "drop 3 healed iq4_nl"
    # dense q2_k (88 MB, 50.0/21.8) is worse on both domains than the smaller healed file
    assert by["dense q2_k"].dominated_by["bytes"] == "drop 3 healed iq4_nl"
    assert [p.label for p in front(points)] == [
        "drop 9 healed q2_k",
        "drop 3 healed iq4_nl",
        "dense iq4_nl",
        "dense q4_k_m",
        "dense q8_0",
    ]


@pytest.mark.parametrize(
    "budget, expected",
    [
        (80e6, "drop 9 healed q2_k"),
        (90e6, "drop 3 healed iq4_nl"),
        (95e6, "dense iq4_nl"),
        (200e6, "dense q8_0"),
    ],
)
def test_choose_under_a_size_budget_lands_within_it_and_on_the_front(budget, expected):
    points = hand_made()
    choice = choose(points, max_bytes=int(budget), budget=f"{budget / 1e6:.0f} MB")
    assert choice.chosen.label == expected
    assert choice.chosen.bytes <= budget
    assert choice.chosen.label in {p.label for p in front(points)}
    reasons = dict((p.label, why) for p, why in choice.rejected)
    assert len(reasons) == len(points) - 1  # every other candidate is accounted for
    if budget == 90e6:
        assert "over" in reasons["dense iq4_nl"]
        assert "dominated by drop 3 healed iq4_nl" in reasons["drop 3 iq4_nl"]
    assert any(line.startswith("chosen: " + expected) for line in choice.lines())


def test_choose_under_a_speed_budget():
    points = hand_made()
    floor = speed_floor(points, 1.5, "x", "dense q8_0")  # 90 tok/s
    assert floor == pytest.approx(90)
    choice = choose(points, min_tps=floor)
    # the healed drop-3 file is faster but worse than dense iq4_nl, which is fast enough
    assert choice.chosen.label == "dense iq4_nl"
    assert choice.chosen.decode_tps >= floor
    why = dict((p.label, w) for p, w in choice.rejected)
    assert "under 90.0 tok/s" in why["dense q4_k_m"]
    assert why["dense q2_k"].startswith("dominated by dense iq4_nl")
    assert choose(points, min_tps=120).chosen.label == "drop 9 healed q2_k"


def test_nothing_fits():
    choice = choose(hand_made(), max_bytes=10_000_000)
    assert choice.chosen is None and len(choice.rejected) == 7


def test_quality_is_the_geometric_mean():
    assert pt("a", 1, 4.0, 9.0).quality() == pytest.approx(6.0)
    assert pt("nan", 1, math.nan, 9.0).quality() == math.inf


@pytest.mark.parametrize(
    "text, n",
    [
        ("80MB", 80_000_000),
        ("1.5GB", 1_500_000_000),
        ("100MiB", 100 * 2**20),
        ("5000", 5000),
        ("2 gb", 2e9),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "abc", "-5MB", "nanMB", "0", "5 parsecs"])
def test_parse_size_refuses(text):
    with pytest.raises(ShrinkError, match="target-size"):
        parse_size(text)


def test_parse_speed():
    assert parse_speed("1.3x") == (1.3, "x")
    assert parse_speed("40tok/s") == (40.0, "tok/s")
    for bad in ("fast", "-1x", "nanx", "0"):
        with pytest.raises(ShrinkError, match="target-speed"):
            parse_speed(bad)
