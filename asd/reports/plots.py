"""PNG plots of the DCASE Task 2 metrics.

Plots take per-clip
columns (``machine_type``, ``domain``, ``label``, ``score``; lists or numpy
arrays, labels ``"normal"``/``"anomaly"`` or 0/1, ``None`` = unlabelled and
skipped, a missing domain = source) and write a PNG through
:func:`asd.io.storage.atomic_write_bytes`, so local paths and ``s3://`` URIs behave
the same and readers never see a half-written image.

Plots are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot
state, safe from worker threads) with the Agg backend. When no labelled clip is
left, a plot function still writes a PNG that carries a "no labelled clips"
note, logs a warning and returns the URI, so links from a report never break.
"""

from __future__ import annotations

import io
import logging
import math
import sys

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # don't switch an interactive session's backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from asd.data.dcase import DOMAINS, SOURCE, TARGET, normalize_domain, normalize_label  # noqa: E402
from asd.io import storage  # noqa: E402
from asd.reports.metrics import MAX_FPR, MetricsResult, _as_list  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 100
NO_DATA_NOTE = "no labelled clips to plot"

__all__ = [
    "plot_roc",
    "plot_score_histograms",
    "plot_method_bars",
    "save_figure",
]


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #
def save_figure(fig: Figure, uri: str) -> str:
    """Render ``fig`` as PNG bytes, write them atomically to ``uri``, close the figure."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        return storage.atomic_write_bytes(uri, buf.getvalue())
    finally:
        plt.close(fig)  # no-op for figures that pyplot does not manage


def _clips(machine_type, domain, label, score) -> dict[str, dict[str, np.ndarray]]:
    """Labelled clips grouped by machine type: ``{type: {"target", "y", "score"}}``."""
    types = [str(t) for t in _as_list(machine_type, "machine_type")]
    n = len(types)
    domains = [None] * n if domain is None else _as_list(domain, "domain")
    labels = [normalize_label(v) for v in _as_list(label, "label")]
    scores = _as_list(score, "score")
    if {len(domains), len(labels), len(scores)} != {n}:
        raise ValueError("machine_type, domain, label and score must have equal lengths")
    grouped: dict[str, dict[str, list]] = {}
    for t, d, y, s in zip(types, domains, labels, scores):
        if y is None:
            continue
        g = grouped.setdefault(t, {"target": [], "y": [], "score": []})
        g["target"].append(normalize_domain(d) == TARGET)
        g["y"].append(y)
        g["score"].append(float(s))
    return {
        t: {"target": np.asarray(g["target"], dtype=bool), "y": np.asarray(g["y"], dtype=int),
            "score": np.asarray(g["score"], dtype=float)}
        for t, g in sorted(grouped.items())
    }


def _note_figure(what: str, note: str = NO_DATA_NOTE) -> Figure:
    logger.warning("%s: %s; the figure is a placeholder that says so", what, note)
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"{what}\n{note}", ha="center", va="center", fontsize=12)
    return fig


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    ncols = max(1, min(max_cols, n))
    return math.ceil(n / ncols), ncols


def plot_roc(out_png_uri: str, machine_type, domain, label, score) -> str:
    """:func:`roc_figure` written as PNG to ``out_png_uri``."""
    return save_figure(roc_figure(machine_type, domain, label, score), out_png_uri)


def roc_figure(machine_type, domain, label, score) -> Figure:
    """ROC curves, one panel per machine type with a source and a target curve.

    As in the official AUCs, the source curve uses the source-domain normals
    plus all anomalies, the target curve the target normals plus all anomalies.
    The curves pool all sections of a type, so the AUC in the legend is the
    pooled one (it can differ from the per-section AUCs of the metrics table).
    The shaded band marks the pAUC range FPR <= 0.1.
    """
    data = _clips(machine_type, domain, label, score)
    if not data:
        return _note_figure("ROC curves")
    nrows, ncols = _grid(len(data))
    fig = Figure(figsize=(4.2 * ncols, 4.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (mtype, d) in zip(axes, data.items()):
        anomaly = d["y"] == 1
        ax.axvspan(0.0, MAX_FPR, color="0.92", zorder=0)
        ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1)
        for dom, color in ((SOURCE, "tab:blue"), (TARGET, "tab:orange")):
            is_dom = d["target"] if dom == TARGET else ~d["target"]
            rows = is_dom | anomaly
            y, s = d["y"][rows], d["score"][rows]
            if y.min(initial=1) == 1 or y.max(initial=0) == 0:
                ax.plot([], [], color=color, label=f"{dom}: n/a ({int(np.sum(y == 0))} normal, "
                                                     f"{int(np.sum(y == 1))} anomalous)")
                continue
            fpr, tpr, _ = roc_curve(y, s)
            auc = roc_auc_score(y, s)
            ax.plot(fpr, tpr, color=color, lw=1.8, label=f"{dom}: AUC {100 * auc:.2f}%")
        ax.set_title(mtype)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(data):]:
        ax.set_axis_off()
    fig.suptitle("ROC per machine type (sections pooled; domain normals vs all anomalies)")
    return fig


def plot_score_histograms(out_png_uri: str, machine_type, domain, label, score,
                          threshold: dict[str, float] | None = None) -> str:
    """:func:`histogram_figure` written as PNG to ``out_png_uri``."""
    return save_figure(histogram_figure(machine_type, domain, label, score, threshold), out_png_uri)


def histogram_figure(machine_type, domain, label, score, threshold: dict[str, float] | None = None) -> Figure:
    """Anomaly-score histograms: per machine type a row with a source and a target panel.

    Each panel overlays the domain's normal and anomalous clips (the domain's
    own clips, as in the official evaluator's score plots) on bins shared by
    the whole row. ``threshold`` maps machine type -> decision threshold, drawn
    as a vertical dashed line.
    """
    data = _clips(machine_type, domain, label, score)
    if not data:
        return _note_figure("anomaly score histograms")
    threshold = threshold or {}
    n = len(data)
    fig = Figure(figsize=(10, 2.8 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 2, squeeze=False)
    for row, (mtype, d) in zip(axes, data.items()):
        values = d["score"]
        thr = threshold.get(mtype)
        if thr is not None and not math.isfinite(float(thr)):
            thr = None
        lo, hi = float(values.min()), float(values.max())
        if thr is not None:
            thr = float(thr)
            lo, hi = min(lo, thr), max(hi, thr)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 31)
        for ax, dom in zip(row, DOMAINS):
            is_dom = d["target"] if dom == TARGET else ~d["target"]
            normal = values[is_dom & (d["y"] == 0)]
            anomal = values[is_dom & (d["y"] == 1)]
            ax.hist(normal, bins=bins, alpha=0.55, color="tab:blue", label=f"normal ({normal.size})")
            ax.hist(anomal, bins=bins, alpha=0.55, color="tab:red", label=f"anomaly ({anomal.size})")
            if thr is not None:
                ax.axvline(thr, color="k", ls="--", lw=1.2, label=f"threshold {thr:.4g}")
            if normal.size + anomal.size == 0:
                ax.text(0.5, 0.5, f"no {dom} clips", transform=ax.transAxes, ha="center",
                        va="center", color="0.4")
            ax.set_title(f"{mtype} - {dom}")
            ax.set_xlabel("anomaly score")
            ax.set_ylabel("clips")
            ax.legend(fontsize=8)
    fig.suptitle("Anomaly score distributions")
    return fig


def plot_method_bars(out_png_uri: str, results: dict[str, MetricsResult]) -> str:
    """:func:`method_bars_figure` written as PNG to ``out_png_uri``."""
    return save_figure(method_bars_figure(results), out_png_uri)


def method_bars_figure(results: dict[str, MetricsResult]) -> Figure:
    """Grouped bars: per machine type the hmean of each method, plus ``overall`` (official score)."""
    types = sorted({t for r in results.values() for t in r.machine_types})
    if not results or not types:
        return _note_figure("method comparison", "no metrics to compare")
    groups = types + ["overall"]
    methods = list(results)
    x = np.arange(len(groups), dtype=float)
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 1.0 + 0.45 * len(groups) * max(2, len(methods))), 4.5),
                 layout="constrained")
    ax = fig.add_subplot()
    for i, m in enumerate(methods):
        r = results[m]
        vals = [r.per_type.get(t, float("nan")) for t in types] + [r.official_score]
        heights = np.array([100.0 * v for v in vals], dtype=float)
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, np.nan_to_num(heights, nan=0.0), width, label=m)
        for bar, h in zip(bars, heights):
            text = "n/a" if math.isnan(h) else f"{h:.1f}"
            ax.text(bar.get_x() + bar.get_width() / 2, (0 if math.isnan(h) else h) + 1, text,
                    ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(50, color="0.5", ls=":", lw=1)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylim(0, 112)
    ax.set_ylabel("hmean of AUC-s, AUC-t, pAUC (%)")
    ax.set_title("Per machine type hmean and official score by method")
    ax.legend(fontsize=8, ncols=min(4, len(methods)), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return fig
