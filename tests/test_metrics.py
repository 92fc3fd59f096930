"""Tests for asd.reports.metrics: hand-computed AUC / pAUC, the source/target rule, hmean
pooling, NaN handling, a random case against direct sklearn calls, result CSVs."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
from scipy.stats import hmean
from sklearn.metrics import roc_auc_score

from asd.reports import metrics
from asd.reports.metrics import (
    MetricsResult,
    SectionMetrics,
    evaluate,
    evaluate_table,
    harmonic_mean,
    read_result_csv,
    result_csv_name,
    write_result_csvs,
)


def _one_section(domain, label, score, machine_type="fan", section="00"):
    n = len(label)
    return evaluate([machine_type] * n, [section] * n, domain, label, score)


# --------------------------------------------------------------------------- #
# Hand-computed values
# --------------------------------------------------------------------------- #
# Section fan/00:
#   source normals  0.1 0.2 0.6 0.8
#   target normals  0.3 0.95
#   anomalies       0.5 (source), 0.9 (target)
HAND_DOMAIN = ["source"] * 4 + ["target"] * 2 + ["source", "target"]
HAND_LABEL = ["normal"] * 6 + ["anomaly"] * 2
HAND_SCORE = [0.1, 0.2, 0.6, 0.8, 0.3, 0.95, 0.5, 0.9]


def test_auc_by_counting_pairs_and_source_target_rule():
    res = _one_section(HAND_DOMAIN, HAND_LABEL, HAND_SCORE)
    (sec,) = res.sections
    # AUC-source: BOTH anomalies vs the 4 source normals = 8 pairs.
    #   0.5 beats 0.1, 0.2           -> 2
    #   0.9 beats 0.1, 0.2, 0.6, 0.8 -> 4
    #   6 / 8 = 0.75
    assert sec.auc_source == pytest.approx(0.75)
    # AUC-target: BOTH anomalies vs the 2 target normals = 4 pairs.
    #   0.5 beats 0.3 -> 1 ; 0.9 beats 0.3 -> 1 ; 2 / 4 = 0.5
    assert sec.auc_target == pytest.approx(0.5)
    # If only same-domain anomalies counted (wrong rule), AUC-source would be
    # 0.5 (0.5 beats 2 of 4) and AUC-target 0.5 (0.9 beats 1 of 2).
    assert sec.auc_source != pytest.approx(0.5)
    assert (sec.n_normal_source, sec.n_normal_target) == (4, 2)
    assert (sec.n_anomaly_source, sec.n_anomaly_target) == (1, 1)
    assert (sec.machine_type, sec.section) == ("fan", "00")


def test_pauc_mcclish_by_hand_over_all_clips_of_the_section():
    # 20 normals with scores 0..19 (10 source, 10 target), 4 anomalies
    # 100, 18.5, 17.5, 5 (2 per domain). The ROC curve over ALL 24 clips starts
    #   (0, .25) after 100; 19 is a normal -> FPR .05; 18.5 -> TPR .5;
    #   18 is a normal -> FPR .10; 17.5 -> TPR .75 at FPR .10.
    # Raw partial area for FPR in [0, 0.1]: .05 * .25 + .05 * .5 = 0.0375.
    # McClish: min = 0.1**2 / 2 = 0.005, max = 0.1
    #   0.5 * (1 + (0.0375 - 0.005) / (0.1 - 0.005)) = 0.5 * (1 + 13/38) = 51/76
    normals = list(range(20))
    anomalies = [100, 18.5, 17.5, 5]
    domain = ["source", "target"] * 10 + ["source", "target", "source", "target"]
    label = [0] * 20 + [1] * 4
    res = _one_section(domain, label, normals + anomalies)
    assert res.sections[0].pauc == pytest.approx(51 / 76, abs=1e-12)
    assert res.sections[0].pauc == pytest.approx(
        roc_auc_score(label, normals + anomalies, max_fpr=0.1), abs=1e-15)


def test_pauc_source_target_use_the_auc_row_sets():
    res = _one_section(HAND_DOMAIN, HAND_LABEL, HAND_SCORE)
    sec = res.sections[0]
    y = np.array([0] * 6 + [1] * 2)
    s = np.array(HAND_SCORE)
    src = np.array([True] * 4 + [False] * 2 + [True, True])
    tgt = np.array([False] * 4 + [True] * 2 + [True, True])
    assert sec.pauc_source == pytest.approx(roc_auc_score(y[src], s[src], max_fpr=0.1))
    assert sec.pauc_target == pytest.approx(roc_auc_score(y[tgt], s[tgt], max_fpr=0.1))
    assert sec.pauc == pytest.approx(roc_auc_score(y, s, max_fpr=0.1))


def test_integer_labels_and_section_forms_are_equivalent():
    a = _one_section(HAND_DOMAIN, HAND_LABEL, HAND_SCORE, section="00")
    b = _one_section(HAND_DOMAIN, [0] * 6 + [1] * 2, np.array(HAND_SCORE), section=0)
    c = _one_section(np.array(HAND_DOMAIN), HAND_LABEL, HAND_SCORE, section="section_00")
    assert a.to_dict() == b.to_dict() == c.to_dict()


# --------------------------------------------------------------------------- #
# Harmonic means
# --------------------------------------------------------------------------- #
def test_harmonic_mean_basics():
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / (2 + 1))
    assert harmonic_mean([0.5, float("nan"), 1.0]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.5, 0.0, 1.0]) == 0.0
    assert math.isnan(harmonic_mean([]))
    assert math.isnan(harmonic_mean([float("nan")]))
    with pytest.raises(ValueError):
        harmonic_mean([-0.1, 0.5])


def test_official_score_pools_all_values_into_one_hmean():
    # Two types; type "a" has two sections, type "b" one. Pooling differs from
    # a mean of per-type means because "a" contributes twice as many values.
    rng = np.random.default_rng(0)
    rows = {"machine_type": [], "section": [], "domain": [], "label": [], "score": []}
    for mtype, sec, shift in [("a", "00", 0.2), ("a", "01", 2.0), ("b", "00", 0.8)]:
        for dom in ("source", "target"):
            for lab, mu in (("normal", 0.0), ("anomaly", shift)):
                for _ in range(15):
                    rows["machine_type"].append(mtype)
                    rows["section"].append(sec)
                    rows["domain"].append(dom)
                    rows["label"].append(lab)
                    rows["score"].append(rng.normal(mu, 1.0))
    res = evaluate(**rows)
    pooled = [v for s in res.sections for v in (s.auc_source, s.auc_target, s.pauc)]
    assert len(pooled) == 9
    assert res.official_score == pytest.approx(hmean(pooled))
    a_vals = [v for s in res.sections if s.machine_type == "a"
              for v in (s.auc_source, s.auc_target, s.pauc)]
    assert res.per_type["a"] == pytest.approx(hmean(a_vals))
    assert res.per_type["b"] == pytest.approx(hmean(res.sections[2].official_values()))
    # not the hmean of the per-type hmeans
    assert res.official_score != pytest.approx(hmean(list(res.per_type.values())), abs=1e-9)
    assert [(s.machine_type, s.section) for s in res.sections] == [("a", "00"), ("a", "01"), ("b", "00")]


# --------------------------------------------------------------------------- #
# NaN handling and unlabelled / missing inputs
# --------------------------------------------------------------------------- #
def test_no_target_normals_gives_nan_excluded_with_warning(caplog):
    domain = ["source"] * 4 + ["source", "target"]
    label = ["normal"] * 4 + ["anomaly"] * 2
    score = [0.1, 0.2, 0.3, 0.4, 0.9, 0.35]
    with caplog.at_level(logging.WARNING, logger="asd.reports.metrics"):
        res = _one_section(domain, label, score)
    sec = res.sections[0]
    assert math.isnan(sec.auc_target) and math.isnan(sec.pauc_target)
    # 0.9 beats 4, 0.35 beats 3 -> 7 / 8
    assert sec.auc_source == pytest.approx(7 / 8)
    assert res.official_score == pytest.approx(hmean([sec.auc_source, sec.pauc]))
    assert any("AUC (target)" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)
    d = res.to_dict()
    assert d["sections"][0]["auc_target"] is None
    json.dumps(d, allow_nan=False)  # JSON-able without NaN


def test_section_without_anomalies_is_all_nan_and_does_not_crash(caplog):
    mt = ["fan"] * 4 + ["pump"] * 4
    sec = ["00"] * 8
    dom = ["source", "target"] * 4
    lab = ["normal"] * 4 + ["normal", "normal", "anomaly", "anomaly"]
    sc = [0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.9, 0.8]
    with caplog.at_level(logging.WARNING, logger="asd.reports.metrics"):
        res = evaluate(mt, sec, dom, lab, sc)
    fan = res.sections[0]
    assert all(math.isnan(v) for v in (fan.auc_source, fan.auc_target, fan.pauc,
                                       fan.pauc_source, fan.pauc_target))
    assert math.isnan(res.per_type["fan"])
    assert res.per_type["pump"] == pytest.approx(1.0)
    assert res.official_score == pytest.approx(1.0)
    assert caplog.records


def test_unlabelled_rows_ignored_and_all_unlabelled_is_nan():
    base = _one_section(HAND_DOMAIN, HAND_LABEL, HAND_SCORE)
    extra = _one_section(HAND_DOMAIN + ["target", "source"], HAND_LABEL + [None, float("nan")],
                         HAND_SCORE + [0.0, 123.0])
    assert extra.to_dict() == base.to_dict()
    empty = _one_section(["source"] * 3, [None] * 3, [0.1, 0.2, 0.3])
    assert empty.sections == [] and empty.per_type == {}
    assert math.isnan(empty.official_score)
    assert empty.to_dict()["official_score"] is None


def test_missing_domain_counts_as_source():
    label = ["normal"] * 4 + ["anomaly"] * 2
    score = [0.1, 0.2, 0.3, 0.4, 0.9, 0.35]
    whole = _one_section(None, label, score)
    per_row = _one_section([None] * 6, label, score)
    sec = whole.sections[0]
    assert sec.auc_source == pytest.approx(7 / 8) and math.isnan(sec.auc_target)
    assert sec.n_normal_source == 4 and sec.n_anomaly_source == 2
    assert whole.to_dict() == per_row.to_dict()


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        evaluate(["fan"], ["00"], None, ["broken"], [0.1])
    with pytest.raises(ValueError):
        evaluate(["fan", "fan"], ["00"], None, ["normal"], [0.1])
    with pytest.raises(ValueError):
        evaluate(["fan"] * 2, ["00"] * 2, None, ["normal", "anomaly"], [0.1, float("nan")])


# --------------------------------------------------------------------------- #
# Random case against direct sklearn calls, tables
# --------------------------------------------------------------------------- #
def _random_rows(seed=1):
    rng = np.random.default_rng(seed)
    rows = []
    for mtype in ("bearing", "fan", "ToyCar"):
        for sec in ("00", "01"):
            n = 60
            dom = rng.choice(["source", "target"], size=n, p=[0.8, 0.2])
            lab = rng.choice([0, 1], size=n)
            lab[:4] = [0, 0, 1, 1]
            dom[:4] = ["source", "target", "source", "target"]
            sc = rng.normal(size=n) + lab * rng.uniform(0.2, 1.5)
            rows += [(mtype, sec, d, ("anomaly" if l else "normal"), float(s))
                     for d, l, s in zip(dom, lab, sc)]
    rng.shuffle(rows)
    return rows


def test_random_case_matches_direct_sklearn_calls():
    rows = _random_rows()
    mt, sec, dom, lab, sc = (list(c) for c in zip(*rows))
    res = evaluate(mt, sec, dom, lab, sc)
    assert len(res.sections) == 6
    pooled = []
    for s in res.sections:
        sel = [r for r in rows if r[0] == s.machine_type and r[1] == s.section]
        y = np.array([r[3] == "anomaly" for r in sel], dtype=int)
        p = np.array([r[4] for r in sel])
        tgt = np.array([r[2] == "target" for r in sel])
        src_rows = ~tgt | (y == 1)
        tgt_rows = tgt | (y == 1)
        assert s.auc_source == pytest.approx(roc_auc_score(y[src_rows], p[src_rows]), abs=1e-12)
        assert s.auc_target == pytest.approx(roc_auc_score(y[tgt_rows], p[tgt_rows]), abs=1e-12)
        assert s.pauc == pytest.approx(roc_auc_score(y, p, max_fpr=0.1), abs=1e-12)
        assert s.pauc_source == pytest.approx(
            roc_auc_score(y[src_rows], p[src_rows], max_fpr=0.1), abs=1e-12)
        assert s.pauc_target == pytest.approx(
            roc_auc_score(y[tgt_rows], p[tgt_rows], max_fpr=0.1), abs=1e-12)
        pooled += [s.auc_source, s.auc_target, s.pauc]
    assert res.official_score == pytest.approx(hmean(pooled), abs=1e-12)
    assert set(res.per_type) == {"bearing", "fan", "ToyCar"}


def test_evaluate_table_arrow_and_pandas():
    import pyarrow as pa

    rows = _random_rows(seed=2)
    cols = dict(zip(["machine_type", "section", "domain", "label", "score"],
                    (list(c) for c in zip(*rows))))
    direct = evaluate(**cols)
    assert evaluate_table(pa.table(cols)).to_dict() == direct.to_dict()
    pd = pytest.importorskip("pandas")
    assert evaluate_table(pd.DataFrame(cols)).to_dict() == direct.to_dict()
    # domain column absent -> all source
    no_dom = {k: v for k, v in cols.items() if k != "domain"}
    res = evaluate_table(pa.table(no_dom))
    assert all(math.isnan(s.auc_target) for s in res.sections)
    with pytest.raises(ValueError):
        evaluate_table(pa.table({"machine_type": ["fan"]}))


def test_to_rows_and_dataclasses():
    res = _one_section(HAND_DOMAIN, HAND_LABEL, HAND_SCORE)
    assert isinstance(res, MetricsResult) and isinstance(res.sections[0], SectionMetrics)
    (row,) = res.to_rows()
    assert row["auc_source"] == pytest.approx(0.75)
    assert set(row) == {
        "machine_type", "section", "auc_source", "auc_target", "pauc", "pauc_source",
        "pauc_target", "n_normal_source", "n_normal_target", "n_anomaly_source",
        "n_anomaly_target"}


# --------------------------------------------------------------------------- #
# Result CSV files
# --------------------------------------------------------------------------- #
def test_result_csv_name():
    assert result_csv_name("anomaly_score", "fan", "00") == "anomaly_score_fan_section_00_test.csv"
    assert result_csv_name("decision_result", "ToyCar", 3) == "decision_result_ToyCar_section_03_test.csv"
    assert result_csv_name("anomaly_score", "fan", "section_01") == "anomaly_score_fan_section_01_test.csv"
    with pytest.raises(ValueError):
        result_csv_name("scores", "fan", "00")


def test_write_and_read_result_csvs_round_trip(tmp_path):
    names = ["/data/fan/test/section_00_source_test_normal_0000.wav",
             "section_00_target_test_anomaly_0001.wav"]
    scores = [0.1234567890123456789, -3.5e-7]
    uris = write_result_csvs(str(tmp_path / "out"), "fan", "00", names, np.array(scores), [0, 1])
    assert [os.path.basename(u) for u in uris] == [
        "anomaly_score_fan_section_00_test.csv", "decision_result_fan_section_00_test.csv"]
    got = read_result_csv(uris[0])
    assert got == [("section_00_source_test_normal_0000.wav", scores[0]),
                   ("section_00_target_test_anomaly_0001.wav", scores[1])]
    assert read_result_csv(uris[1]) == [("section_00_source_test_normal_0000.wav", 0.0),
                                        ("section_00_target_test_anomaly_0001.wav", 1.0)]
    # no header: the first line is the first clip; no temp files left behind
    with open(uris[0]) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("section_00_source_test_normal_0000.wav,")
    assert len(lines) == 2
    with open(uris[1]) as f:
        assert f.read() == ("section_00_source_test_normal_0000.wav,0\n"
                            "section_00_target_test_anomaly_0001.wav,1\n")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(u) for u in uris)


def test_write_result_csvs_validation(tmp_path):
    out = str(tmp_path)
    with pytest.raises(ValueError):
        write_result_csvs(out, "fan", "00", ["a.wav", "a.wav"], [0.1, 0.2], [0, 0])
    with pytest.raises(ValueError):
        write_result_csvs(out, "fan", "00", ["a.wav"], [0.1, 0.2], [0])
    with pytest.raises(ValueError):
        write_result_csvs(out, "fan", "00", ["a.wav"], [0.1], [2])
    assert os.listdir(out) == []  # validated before anything is written
    bools = write_result_csvs(out, "fan", "00", ["a.wav", "b.wav"], [0.1, 0.2],
                              np.array([True, False]))
    assert [v for _, v in read_result_csv(bools[1])] == [1.0, 0.0]
    only_scores = write_result_csvs(out, "fan", "01", ["a.wav"], [0.5], None)
    assert len(only_scores) == 1 and only_scores[0].endswith("anomaly_score_fan_section_01_test.csv")


def test_module_constants():
    assert metrics.MAX_FPR == 0.1
