"""Tests for asd.reports (tables and plots): Markdown tables carry the right numbers and rows; every figure shows
the data it was given (panels, curves, counts, bar heights) and is written as a PNG of that
figure; all-unlabelled input writes a placeholder figure that says so."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest

from asd.reports import plots, tables
from asd.reports.metrics import MetricsResult, SectionMetrics, evaluate, harmonic_mean

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sec(mtype, section, auc_s, auc_t, pauc, pauc_s=0.6, pauc_t=0.55):
    return SectionMetrics(mtype, section, auc_s, auc_t, pauc, pauc_s, pauc_t, 10, 10, 5, 5)


def _result(sections):
    official = harmonic_mean(v for s in sections for v in s.official_values())
    per_type = {t: harmonic_mean(v for s in sections if s.machine_type == t
                                 for v in s.official_values())
                for t in sorted({s.machine_type for s in sections})}
    return MetricsResult(sections=sections, official_score=official, per_type=per_type)


RESULT_A = _result([
    _sec("fan", "00", 0.8, 0.6, 0.5),
    _sec("fan", "01", 0.9, 0.7, 0.6),
    _sec("pump", "00", 0.75, float("nan"), 0.55),
])
RESULT_B = _result([
    _sec("fan", "00", 0.85, 0.65, 0.55),
    _sec("valve", "00", 0.5, 0.5, 0.5),
])


def _clip_columns(seed=0, types=("fan", "pump", "valve"), n=80):
    rng = np.random.default_rng(seed)
    mt, dom, lab, sc = [], [], [], []
    for t in types:
        for _ in range(n):
            d = "source" if rng.random() < 0.7 else "target"
            y = int(rng.random() < 0.4)
            mt.append(t)
            dom.append(d)
            lab.append("anomaly" if y else "normal")
            sc.append(float(rng.normal(1.2 * y, 1.0)))
    return np.array(mt), np.array(dom), lab, np.array(sc)


def _assert_png(path, fig_size_in=None, min_bytes=5_000):
    """A PNG that decodes, of the figure's size, with something drawn on it."""
    from matplotlib import image

    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes, len(data)
    pixels = image.imread(path)
    if fig_size_in is not None:
        w, h = fig_size_in
        assert pixels.shape[:2] == (round(h * plots.DPI), round(w * plots.DPI))
    assert pixels[..., :3].std() > 0.01  # not one flat colour
    # atomic write leaves no staging files next to it
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


# --------------------------------------------------------------------------- #
# Markdown
# --------------------------------------------------------------------------- #
def test_metrics_markdown_numbers_and_rows():
    md = tables.metrics_markdown(RESULT_A, title="run 1")
    lines = md.splitlines()
    assert lines[0] == "### run 1"
    header = next(line for line in lines if line.startswith("| machine type"))
    for col in ("AUC-s", "AUC-t", "pAUC", "pAUC-s", "pAUC-t", "hmean"):
        assert col in header
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| machine")]
    # 3 section rows + 2 type hmean rows
    assert len(rows) == 5
    fan00 = next(r for r in rows if r.startswith("| fan | 00 |"))
    assert "| 80.00 | 60.00 | 50.00 | 60.00 | 55.00 |" in fan00
    assert fan00.rstrip(" |").endswith(f"{100 * harmonic_mean([0.8, 0.6, 0.5]):.2f}")
    pump00 = next(r for r in rows if r.startswith("| pump | 00 |"))
    assert "| 75.00 | n/a | 55.00 |" in pump00
    fan_h = next(r for r in rows if r.startswith("| **fan** | **hmean** |"))
    assert f"| {100 * harmonic_mean([0.8, 0.9]):.2f} |" in fan_h  # AUC-s over sections
    assert f"**{100 * RESULT_A.per_type['fan']:.2f}**" in fan_h
    assert any(r.startswith("| **pump** | **hmean** |") for r in rows)
    # rows order: fan sections, fan hmean, pump section, pump hmean
    assert [r.split("|")[1].strip() for r in rows] == ["fan", "fan", "**fan**", "pump", "**pump**"]
    official = next(line for line in lines if "official score (hmean)" in line)
    assert f"{100 * RESULT_A.official_score:.2f} %" in official
    assert "8 values" in official  # the NaN AUC-t is excluded


def test_metrics_markdown_from_evaluate_and_empty():
    mt, dom, lab, sc = _clip_columns()
    res = evaluate(mt, ["00"] * len(mt), dom, lab, sc)
    md = tables.metrics_markdown(res)
    assert not md.startswith("###")
    for s in res.sections:
        assert f"| {s.machine_type} | 00 | {100 * s.auc_source:.2f} | {100 * s.auc_target:.2f} |" in md
    empty = MetricsResult(sections=[], official_score=float("nan"), per_type={})
    assert "official score (hmean): n/a" in tables.metrics_markdown(empty)


def test_methods_markdown_side_by_side():
    md = tables.methods_markdown({"baseline": RESULT_A, "ours": RESULT_B})
    lines = md.splitlines()
    assert lines[0].startswith("| machine type | baseline AUC-s | baseline AUC-t | baseline pAUC |")
    assert "ours AUC-s" in lines[0] and "ours score" in lines[0]
    body = lines[2:]
    assert [line.split("|")[1].strip() for line in body] == ["fan", "pump", "valve", "**hmean (all)**"]
    fan = body[0].split("|")[2:-1]
    fan = [c.strip() for c in fan]
    assert fan[:4] == [f"{100 * harmonic_mean([0.8, 0.9]):.2f}", f"{100 * harmonic_mean([0.6, 0.7]):.2f}",
                       f"{100 * harmonic_mean([0.5, 0.6]):.2f}", f"{100 * RESULT_A.per_type['fan']:.2f}"]
    assert fan[4:] == ["85.00", "65.00", "55.00", f"{100 * RESULT_B.per_type['fan']:.2f}"]
    valve = [c.strip() for c in body[2].split("|")[2:-1]]
    assert valve[:4] == ["n/a"] * 4 and valve[4:] == ["50.00"] * 3 + ["50.00"]
    last = [c.strip() for c in body[3].split("|")[2:-1]]
    assert last[3] == f"**{100 * RESULT_A.official_score:.2f}**"
    assert last[7] == f"**{100 * RESULT_B.official_score:.2f}**"
    assert last[0] == f"{100 * harmonic_mean([0.8, 0.9, 0.75]):.2f}"


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #
def test_roc_figure_shows_each_types_source_and_target_auc(tmp_path):
    from sklearn.metrics import roc_auc_score

    mt, dom, lab, sc = _clip_columns()
    lab = list(lab)
    lab[0] = None  # unlabelled clips are skipped
    fig = plots.roc_figure(mt, dom, lab, sc)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["fan", "pump", "valve"]
    keep = np.array([v is not None for v in lab])
    y = np.array([v == "anomaly" for v in lab])
    for ax in panels:
        t = (mt == ax.get_title()) & keep
        for d in ("source", "target"):  # the domain's normals against every anomaly of the type
            rows = t & ((dom == d) | y)
            auc = roc_auc_score(y[rows], sc[rows])
            assert f"{d}: AUC {100 * auc:.2f}%" in _legend(ax)
        curve = [ln for ln in ax.get_lines() if ln.get_label().startswith("source")][0]
        fpr, tpr = curve.get_data()
        assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    uri = plots.plot_roc(str(tmp_path / "plots" / "roc.png"), mt, dom, lab, sc)
    assert uri == str(tmp_path / "plots" / "roc.png")
    _assert_png(uri, fig.get_size_inches())


def test_roc_figure_says_when_a_domain_has_no_normals():
    mt, _, lab, sc = _clip_columns(types=("fan",))
    fig = plots.roc_figure(mt, None, lab, sc)  # no domains: every clip counts as source
    n_normal, n_anomalous = sum(v == "normal" for v in lab), sum(v == "anomaly" for v in lab)
    legend = _legend(fig.axes[0])
    assert legend[0].startswith("source: AUC")
    assert legend[1] == f"target: n/a (0 normal, {n_anomalous} anomalous)" and n_normal > 0


def test_histogram_figure_counts_each_domains_clips_and_draws_the_threshold(tmp_path):
    mt, dom, lab, sc = _clip_columns()
    fig = plots.histogram_figure(list(mt), list(dom), lab, list(sc), threshold={"fan": 0.7, "pump": 1.0})
    titled = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(titled) == {f"{t} - {d}" for t in ("fan", "pump", "valve") for d in ("source", "target")}
    y = np.array([v == "anomaly" for v in lab])
    for title, ax in titled.items():
        t, d = title.split(" - ")
        rows = (mt == t) & (dom == d)
        normal, anomalous = int(np.sum(rows & ~y)), int(np.sum(rows & y))
        legend = _legend(ax)
        assert f"normal ({normal})" in legend and f"anomaly ({anomalous})" in legend
        drawn = sum(p.get_height() for p in ax.patches)  # histogram bars hold every clip once
        assert drawn == normal + anomalous
        assert any(s.startswith("threshold") for s in legend) == (t in ("fan", "pump"))
    uri = plots.plot_score_histograms(str(tmp_path / "hist.png"), list(mt), list(dom), lab,
                                       list(sc), threshold={"fan": 0.7, "pump": 1.0})
    _assert_png(uri, fig.get_size_inches())


def test_method_bars_figure_draws_each_methods_hmeans(tmp_path):
    fig = plots.method_bars_figure({"baseline": RESULT_A, "ours": RESULT_B})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fan", "pump", "valve", "overall"]
    bars = [p.get_height() for p in ax.patches]
    expected = [100 * RESULT_A.per_type["fan"], 100 * RESULT_A.per_type["pump"], 0.0, 100 * RESULT_A.official_score,
                100 * RESULT_B.per_type["fan"], 0.0, 100 * RESULT_B.per_type["valve"], 100 * RESULT_B.official_score]
    assert bars == pytest.approx(expected)
    assert _legend(ax) == ["baseline", "ours"]
    assert "n/a" in [t.get_text() for t in ax.texts]  # a type a method has no score for says so
    uri = plots.plot_method_bars(str(tmp_path / "bars.png"), {"baseline": RESULT_A, "ours": RESULT_B})
    _assert_png(uri, fig.get_size_inches())


def test_all_unlabelled_writes_placeholder_with_warning(tmp_path, caplog):
    mt = ["fan"] * 5
    with caplog.at_level(logging.WARNING, logger="asd.reports.plots"):
        roc = plots.plot_roc(str(tmp_path / "roc.png"), mt, ["source"] * 5, [None] * 5, np.arange(5.0))
        hist = plots.plot_score_histograms(str(tmp_path / "hist.png"), mt, None, [None] * 5,
                                            np.arange(5.0), threshold={"fan": 1.0})
        bars = plots.plot_method_bars(str(tmp_path / "bars.png"), {})
    for uri in (roc, hist, bars):
        _assert_png(uri, min_bytes=0)
    assert sum(plots.NO_DATA_NOTE in r.getMessage() for r in caplog.records) == 2
    assert len(caplog.records) == 3
    fig = plots.roc_figure(mt, ["source"] * 5, [None] * 5, np.arange(5.0))
    assert [t.get_text() for t in fig.axes[0].texts] == [f"ROC curves\n{plots.NO_DATA_NOTE}"]


def test_save_figure_closes_pyplot_figure(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(np.arange(100) ** 2)
    n_open = len(plt.get_fignums())
    uri = plots.save_figure(fig, str(tmp_path / "f.png"))
    assert len(plt.get_fignums()) == n_open - 1
    _assert_png(uri)


def test_agg_backend():
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


def test_mismatched_lengths_raise(tmp_path):
    with pytest.raises(ValueError):
        plots.plot_roc(str(tmp_path / "x.png"), ["fan"] * 3, None, ["normal"] * 2, [0.1] * 3)
    assert not math.isnan(RESULT_A.official_score)
