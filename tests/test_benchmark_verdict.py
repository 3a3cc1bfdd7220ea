"""The benchmark harness's verdict (benchmarks/run.py): a row is called only when the repeats' ranges do
not overlap, against the peer with the best median, in the right direction for each row."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import run  # noqa: E402  (benchmarks/run.py; its imports are the standard library and benchmarks/machine.py)


def _engine(**rows: list[float]) -> dict:
    base = {k: [1.0, 1.0, 1.0] for k, _, _ in run.ROWS}
    return {"summary": {"repeats": {**base, **rows}}}


def _calls(engines: dict) -> dict[str, tuple[str, str]]:
    return {v["row"]: (v["peer"], v["verdict"]) for v in run.verdict(engines)}


def test_ahead_behind_and_overlap_follow_the_ranges() -> None:
    engines = {
        "stableembed": _engine(short=[110, 112, 111], long=[100, 120, 101], p50=[4.0, 4.1, 4.2], cold=[0.9, 0.8, 0.85]),
        "ort-numpy": _engine(short=[100, 109, 105], long=[105, 106, 104], p50=[4.3, 4.5, 4.4], cold=[0.5, 0.6, 0.55]),
        "fastembed": _engine(short=[90, 95, 92], long=[50, 51, 52], p50=[5.0, 5.1, 5.2], cold=[0.7, 0.75, 0.72]),
    }
    calls = _calls(engines)
    assert calls["short"] == ("ort-numpy", "ahead")     # our worst 110 > their best 109
    assert calls["long"] == ("ort-numpy", "overlap")    # ranges 100-120 and 104-106 overlap
    assert calls["p50"] == ("ort-numpy", "ahead")       # lower is better: our worst 4.2 < their best 4.3
    assert calls["cold"] == ("ort-numpy", "behind")     # our best 0.8 > their worst 0.6
    assert calls["rss"] == ("ort-numpy", "overlap")     # identical figures are never a win


def test_repeats_won_pairs_repeat_i_with_repeat_i_and_leaves_the_verdict_alone() -> None:
    engines = {
        "stableembed": _engine(p50=[4.0, 5.0, 4.1], long=[100, 120, 101], rss=[2.0, 2.0, 2.0]),
        "ort-numpy": _engine(p50=[4.2, 4.9, 4.3], long=[99, 121, 102], rss=[2.0, 2.0, 2.0]),
    }
    rows = {v["row"]: v for v in run.verdict(engines)}
    # lower is better: 4.0 < 4.2 and 4.1 < 4.3 win, 5.0 > 4.9 loses; the ranges overlap, so no verdict
    assert (rows["p50"]["won"], rows["p50"]["repeats"], rows["p50"]["verdict"]) == (2, 3, "overlap")
    assert (rows["long"]["won"], rows["long"]["verdict"]) == (1, "overlap")  # only 100 > 99
    assert rows["rss"]["won"] == 0  # a tie is not a win


def test_best_peer_is_chosen_by_median_and_int8_is_not_a_peer() -> None:
    engines = {
        "stableembed": _engine(mixed=[10, 11, 12]),
        "stableembed-int8": _engine(mixed=[99, 99, 99]),
        "st-torch": _engine(mixed=[5, 30, 6]),   # one lucky repeat: median 6
        "fastembed": _engine(mixed=[8, 9, 9.5]),  # median 9
    }
    row = next(v for v in run.verdict(engines) if v["row"] == "mixed")
    assert row["peer"] == "fastembed" and row["verdict"] == "ahead"
    assert abs(row["ratio"] - 11 / 9) < 1e-12


def test_no_stableembed_result_gives_no_verdict() -> None:
    assert run.verdict({"stableembed": {"error": "export failed"}, "ort-numpy": _engine()}) == []
