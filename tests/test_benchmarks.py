"""benchmarks/accuracy.py's arithmetic: the served recipe's margin over the better baseline per seed."""

import pytest

from benchmarks import accuracy


def test_seed_table_takes_the_better_baseline_per_seed_and_the_median_margin():
    served = accuracy.SERVED
    rows = [{"seed": 0, "official_scores": {"ae_mse": 0.55, "logmel_knn": 0.53, served: 0.60}},
            {"seed": 1, "official_scores": {"ae_mse": 0.61, "logmel_knn": 0.59, served: 0.55}},
            {"seed": 2, "official_scores": {"ae_mse": 0.58, "logmel_knn": 0.60, served: 0.61}}]
    methods = ["ae_mse", "logmel_knn", served]
    table = accuracy._seed_table(rows, methods)
    assert [r["best_baseline"] for r in table["rows"]] == [0.55, 0.61, 0.60]
    assert [r["served_minus_best_baseline"] for r in table["rows"]] == pytest.approx([0.05, -0.06, 0.01])
    assert table["median_served_minus_best_baseline"] == pytest.approx(0.01)
    assert table["median"][served] == pytest.approx(0.60)
    line = accuracy._seed_line("x", table, methods)
    assert "+5.00/-6.00/+1.00 (median +1.00 points)" in line and f"{served} 60.00/55.00/61.00" in line


def test_seed_table_without_the_served_method_has_no_margin():
    rows = [{"seed": 0, "official_scores": {"ae_mse": 0.55, accuracy.SERVED: None}}]
    table = accuracy._seed_table(rows, ["ae_mse", accuracy.SERVED])
    assert table["rows"][0]["served_minus_best_baseline"] is None
    assert table["median_served_minus_best_baseline"] is None
