"""bench/run.py's ratios: each the median of the per-round ratios."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import run  # noqa: E402

pytestmark = pytest.mark.unit


def test_a_ratio_pairs_the_rounds_so_that_drift_cancels():
    # The machine was twice as fast for none's second round and the path's
    # third's: each round's own pair says 1.2 x but one, where the ratio of
    # the medians says 2.4 x.
    path = [{"cpu_us": 240.0}, {"cpu_us": 240.0}, {"cpu_us": 120.0}]
    base = [{"cpu_us": 200.0}, {"cpu_us": 100.0}, {"cpu_us": 100.0}]
    assert run.paired_ratio(path, base) == pytest.approx(1.2)
    assert run.summary(path, "cpu_us") / run.summary(base, "cpu_us") == pytest.approx(2.4)
    assert run.paired_ratio(path, path) == 1.0


def test_a_failed_round_on_either_side_is_left_out():
    base = [{"cpu_us": 100.0}, {"error": "smtp-source timed out"}, {"cpu_us": 100.0}]
    path = [{"cpu_us": 150.0}, {"cpu_us": 900.0}, {"error": "exited 1"}]
    assert run.paired_ratio(path, base) == pytest.approx(1.5)
    assert run.paired_ratio([{"error": "x"}], [{"cpu_us": 1.0}]) is None
    assert run.paired_ratio([{"cpu_us": 1.0}], [{"cpu_us": 0.0}]) is None


def test_the_table_gives_paired_ratios_against_the_first_path_and_haproxy():
    runs = {"direct": [{"per_second": 100.0}, {"per_second": 50.0}, {"per_second": 100.0}],
            "haproxy": [{"per_second": 80.0, "cpu_us": 300.0},
                        {"per_second": 40.0, "cpu_us": 600.0},
                        {"per_second": 80.0, "cpu_us": 300.0}],
            "none": [{"per_second": 60.0, "cpu_us": 540.0},
                     {"per_second": 30.0, "cpu_us": 1080.0},
                     {"per_second": 60.0, "cpu_us": 600.0}]}
    table = run.Bench.table(None, runs, "per_second", ["direct", "haproxy", "none"])
    assert table["none"]["ratio"] == pytest.approx(0.6)
    assert table["none"]["relay_ratio"] == pytest.approx(0.75)
    assert table["none"]["relay_cpu_ratio"] == pytest.approx(1.8)
    assert table["none"]["median"] == 60.0 and table["none"]["cpu_us"] == 600.0
