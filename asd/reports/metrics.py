"""Official DCASE 2023-2025 Task 2 metrics and the challenge's result CSV files.

The rules below follow the official evaluators
(``nttcslab/dcase2023_task2_evaluator``, ``dcase2024_task2_evaluator``,
``dcase2025_task2_evaluator``, script ``dcase202X_task2_evaluator.py``):

* Labels: anomaly = 1 is the positive class, normal = 0; a higher score means
  "more anomalous".
* Per machine type and section, with ``y_domain`` 0 = source, 1 = target:

  - **AUC (source)** = ``roc_auc_score`` over the rows where
    ``(y_domain == source) | (y_true != 0)``: the section's *source-domain
    normal* clips plus *all anomalous clips of the section, from both domains*.
  - **AUC (target)** likewise with the target-domain normals plus all anomalies.
  - **pAUC** = ``roc_auc_score(y_true_all, y_pred_all, max_fpr=0.1)`` over *all*
    clips of the section (both domains). ``max_fpr`` makes scikit-learn return
    the McClish-standardised partial AUC
    ``0.5 * (1 + (A - min) / (max - min))`` with ``A`` the raw area under the
    ROC curve for FPR in [0, max_fpr], ``min = max_fpr**2 / 2`` and
    ``max = max_fpr``; we call it exactly the same way.

  pAUC (source) / pAUC (target), computed on the same row sets as the AUCs, are
  reported as extra columns only (the evaluator has them commented out); they
  are not part of the official score.
* **Official score** = ``scipy.stats.hmean`` over the pooled list
  ``[AUC(source) of every type/section] + [AUC(target) ...] + [pAUC ...]``
  (one harmonic mean over all of them, not a mean of per-type means).
  The evaluator clips every value at ``sys.float_info.epsilon`` before the
  hmean; we return exactly 0 when any value is 0, which is the same number to
  within ~1e-15.
* Per machine type we also report the hmean of that type's own AUC-s, AUC-t and
  pAUC values over its sections.

Differences from the evaluator, on purpose: a value that cannot be computed (a
section without anomalies, or without normals in one domain) is ``NaN`` in the
table and is left out of every harmonic mean, with a ``logging`` warning, rather
than crashing; a missing domain (``None``, DCASE 2020-style names) counts as
source. Rows whose label is ``None`` (unlabelled evaluation clips) are ignored.

Result files (:func:`write_result_csvs`) follow the submission format: no header,
one ``file_name,value`` line per clip, ``file_name`` the bare wav name, in
``anomaly_score_<machine_type>_section_<ss>_test.csv`` and
``decision_result_<machine_type>_section_<ss>_test.csv`` (decision 1 = anomaly).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.stats import hmean as _scipy_hmean
from sklearn.metrics import roc_auc_score

from asd.data.dcase import (
    TARGET,
    is_missing,
    normalize_domain,
    normalize_label,
    normalize_section,
)
from asd.io import storage

logger = logging.getLogger(__name__)

MAX_FPR = 0.1
NORMAL, ANOMALY = "normal", "anomaly"
RESULT_KINDS = ("anomaly_score", "decision_result")

__all__ = [
    "MAX_FPR",
    "SectionMetrics",
    "MetricsResult",
    "evaluate",
    "evaluate_table",
    "harmonic_mean",
    "result_csv_name",
    "write_result_csvs",
    "read_result_csv",
]


# --------------------------------------------------------------------------- #
# Result containers
# --------------------------------------------------------------------------- #
@dataclass
class SectionMetrics:
    """Metrics of one machine type / section (values in [0, 1], NaN = not computable)."""

    machine_type: str
    section: str
    auc_source: float
    auc_target: float
    pauc: float
    pauc_source: float
    pauc_target: float
    n_normal_source: int
    n_normal_target: int
    n_anomaly_source: int
    n_anomaly_target: int

    def official_values(self) -> list[float]:
        """The three values this section contributes to the official score."""
        return [self.auc_source, self.auc_target, self.pauc]

    @property
    def hmean(self) -> float:
        """Harmonic mean of this section's AUC-s, AUC-t and pAUC (NaN-skipping)."""
        return harmonic_mean(self.official_values())


@dataclass
class MetricsResult:
    """All sections plus the official (pooled) and per-machine-type harmonic means."""

    sections: list[SectionMetrics]
    official_score: float  # hmean over all AUC-s, AUC-t, pAUC values
    per_type: dict[str, float] = field(default_factory=dict)  # hmean per machine type

    @property
    def machine_types(self) -> list[str]:
        """Machine types in table order (sorted)."""
        return sorted({s.machine_type for s in self.sections})

    def sections_of(self, machine_type: str) -> list[SectionMetrics]:
        return [s for s in self.sections if s.machine_type == machine_type]

    def to_rows(self) -> list[dict]:
        """One flat dict per section (float NaN kept, so columns stay numeric)."""
        return [asdict(s) for s in self.sections]

    def to_dict(self) -> dict:
        """JSON-able summary; NaN becomes ``None``."""
        return {
            "official_score": _nan_to_none(self.official_score),
            "per_type": {k: _nan_to_none(v) for k, v in self.per_type.items()},
            "sections": [
                {k: _nan_to_none(v) for k, v in row.items()} for row in self.to_rows()
            ],
        }


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #
def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean that skips NaN; 0 if any value is 0; NaN if nothing is left.

    Uses :func:`scipy.stats.hmean` like the official evaluator. Negative values
    are invalid for an AUC and raise ``ValueError``.
    """
    arr = np.asarray([float(v) for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan")
    if np.any(arr < 0):
        raise ValueError(f"harmonic mean of negative values: {arr.tolist()}")
    if np.any(arr == 0):
        return 0.0
    return float(_scipy_hmean(arr))


def _auc(y_true: np.ndarray, y_score: np.ndarray, max_fpr: float | None, what: str) -> float:
    """ROC AUC (or McClish pAUC when ``max_fpr`` is set), NaN with a warning if one class is absent."""
    n_pos = int(np.sum(y_true == 1))
    n_neg = int(np.sum(y_true == 0))
    if n_pos == 0 or n_neg == 0:
        logger.warning(
            "%s is undefined (%d normal, %d anomalous clips): reported as NaN and "
            "excluded from the harmonic means",
            what, n_neg, n_pos,
        )
        return float("nan")
    if max_fpr is None:
        return float(roc_auc_score(y_true, y_score))
    return float(roc_auc_score(y_true, y_score, max_fpr=max_fpr))


def _section_metrics(
    machine_type: str,
    section: str,
    is_target: np.ndarray,
    y_true: np.ndarray,
    y_score: np.ndarray,
    max_fpr: float,
) -> SectionMetrics:
    where = f"{machine_type} section {section}"
    is_anomaly = y_true == 1
    rows_source = ~is_target | is_anomaly  # source normals + all anomalies
    rows_target = is_target | is_anomaly  # target normals + all anomalies
    return SectionMetrics(
        machine_type=machine_type,
        section=section,
        auc_source=_auc(y_true[rows_source], y_score[rows_source], None, f"AUC (source) of {where}"),
        auc_target=_auc(y_true[rows_target], y_score[rows_target], None, f"AUC (target) of {where}"),
        pauc=_auc(y_true, y_score, max_fpr, f"pAUC of {where}"),
        pauc_source=_auc(y_true[rows_source], y_score[rows_source], max_fpr,
                         f"pAUC (source) of {where}"),
        pauc_target=_auc(y_true[rows_target], y_score[rows_target], max_fpr,
                         f"pAUC (target) of {where}"),
        n_normal_source=int(np.sum(~is_target & ~is_anomaly)),
        n_normal_target=int(np.sum(is_target & ~is_anomaly)),
        n_anomaly_source=int(np.sum(~is_target & is_anomaly)),
        n_anomaly_target=int(np.sum(is_target & is_anomaly)),
    )


def _as_list(values: Any, name: str) -> list:
    if values is None:
        raise ValueError(f"{name} is required")
    if hasattr(values, "to_pylist"):  # pyarrow Array / ChunkedArray
        return values.to_pylist()
    if hasattr(values, "tolist"):  # numpy / pandas
        return values.tolist()
    return list(values)


def evaluate(
    machine_type: Sequence,
    section: Sequence,
    domain: Sequence | None,
    label: Sequence,
    score: Sequence,
    max_fpr: float = MAX_FPR,
) -> MetricsResult:
    """Compute the official metrics from per-clip columns of equal length.

    ``label`` holds ``"normal"``/``"anomaly"`` or 0/1; rows with a ``None`` label
    are ignored (unlabelled evaluation clips). ``domain`` may be ``None`` as a
    whole or per row (counted as source). ``section`` may be ``0`` / ``"00"`` /
    ``"section_00"``; it is reported as ``"00"``. Sections are ordered by
    (machine type, section).
    """
    types = [str(t) for t in _as_list(machine_type, "machine_type")]
    n = len(types)
    sections = [normalize_section(s) for s in _as_list(section, "section")]
    domains = [None] * n if domain is None else _as_list(domain, "domain")
    labels = [normalize_label(v) for v in _as_list(label, "label")]
    scores = _as_list(score, "score")
    lengths = {len(sections), len(domains), len(labels), len(scores)}
    if lengths != {n}:
        raise ValueError(
            "machine_type, section, domain, label and score must have equal lengths, got "
            f"{n}, {len(sections)}, {len(domains)}, {len(labels)}, {len(scores)}"
        )

    groups: dict[tuple[str, str], list[int]] = {}
    n_unlabelled = 0
    for i in range(n):
        if labels[i] is None:
            n_unlabelled += 1
            continue
        groups.setdefault((types[i], sections[i]), []).append(i)
    if n_unlabelled:
        logger.info("metrics: ignoring %d unlabelled clips", n_unlabelled)

    results: list[SectionMetrics] = []
    for (mtype, sec) in sorted(groups):
        idx = groups[(mtype, sec)]
        y_true = np.asarray([labels[i] for i in idx], dtype=int)
        y_score = np.asarray([float(scores[i]) for i in idx], dtype=float)
        if not np.all(np.isfinite(y_score)):
            bad = int(np.sum(~np.isfinite(y_score)))
            raise ValueError(f"{mtype} section {sec}: {bad} labelled clips have a non-finite score")
        is_target = np.asarray([normalize_domain(domains[i]) == TARGET for i in idx], dtype=bool)
        results.append(_section_metrics(mtype, sec, is_target, y_true, y_score, max_fpr))

    if not results:
        logger.warning("metrics: no labelled clips; every score is NaN")
    official = harmonic_mean(v for s in results for v in s.official_values())
    per_type = {
        mtype: harmonic_mean(v for s in results if s.machine_type == mtype for v in s.official_values())
        for mtype in sorted({s.machine_type for s in results})
    }
    return MetricsResult(sections=results, official_score=official, per_type=per_type)


def evaluate_table(table: Any, max_fpr: float = MAX_FPR) -> MetricsResult:
    """:func:`evaluate` on a ``pyarrow.Table`` or ``pandas.DataFrame``.

    Needs columns ``machine_type``, ``section``, ``label``, ``score``; ``domain``
    is optional (all source when absent).
    """
    if hasattr(table, "column_names"):  # pyarrow.Table
        names = list(table.column_names)

        def column(name: str) -> list:
            return table.column(name).to_pylist()
    elif hasattr(table, "columns") and hasattr(table, "__getitem__"):  # pandas.DataFrame
        names = [str(c) for c in table.columns]

        def column(name: str) -> list:
            return [None if is_missing(v) else v for v in table[name].tolist()]
    else:
        raise TypeError(f"expected a pyarrow.Table or pandas.DataFrame, got {type(table).__name__}")

    missing = [c for c in ("machine_type", "section", "label", "score") if c not in names]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; has {names}")
    return evaluate(
        column("machine_type"),
        column("section"),
        column("domain") if "domain" in names else None,
        column("label"),
        column("score"),
        max_fpr=max_fpr,
    )


# --------------------------------------------------------------------------- #
# DCASE result CSV files
# --------------------------------------------------------------------------- #
def result_csv_name(kind: str, machine_type: str, section: Any) -> str:
    """``anomaly_score_<type>_section_<ss>_test.csv`` or ``decision_result_...``."""
    if kind not in RESULT_KINDS:
        raise ValueError(f"kind must be one of {RESULT_KINDS}, got {kind!r}")
    return f"{kind}_{machine_type}_section_{normalize_section(section)}_test.csv"


def _bare_name(file_name: Any) -> str:
    name = re.split(r"[/\\]", str(file_name))[-1]
    if not name:
        raise ValueError(f"empty file name from {file_name!r}")
    return name


def _csv_text(rows: Iterable[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def write_result_csvs(
    out_dir: str,
    machine_type: str,
    section: Any,
    file_names: Sequence,
    scores: Sequence,
    decisions: Sequence | None,
) -> list[str]:
    """Write the anomaly-score and decision-result CSVs of one type/section atomically.

    No header; one ``file_name,value`` line per clip in the given order;
    ``file_name`` is reduced to the bare wav name; scores are written with full
    float precision (``repr``), decisions as 0/1 (1 = anomaly). With
    ``decisions=None`` only the anomaly-score file is written. Returns the URIs
    written (anomaly score first).
    """
    names = [_bare_name(f) for f in _as_list(file_names, "file_names")]
    score_values = [float(s) for s in _as_list(scores, "scores")]
    if len(score_values) != len(names):
        raise ValueError(f"{len(names)} file names but {len(score_values)} scores")
    if len(set(names)) != len(names):
        raise ValueError(f"{machine_type} section {section}: duplicate file names")
    if not all(math.isfinite(s) for s in score_values):
        raise ValueError(f"{machine_type} section {section}: non-finite anomaly score")

    decision_values: list[int] | None = None
    if decisions is not None:  # validate everything before writing anything
        decision_values = []
        for d in _as_list(decisions, "decisions"):
            if isinstance(d, (bool, np.bool_)):
                d = int(d)
            if not isinstance(d, (int, np.integer, float, np.floating)) or d not in (0, 1):
                raise ValueError(f"decision must be 0 or 1, got {d!r}")
            decision_values.append(int(d))
        if len(decision_values) != len(names):
            raise ValueError(f"{len(names)} file names but {len(decision_values)} decisions")

    uri = storage.join(out_dir, result_csv_name("anomaly_score", machine_type, section))
    written = [storage.atomic_write_text(
        uri, _csv_text((n, repr(s)) for n, s in zip(names, score_values)))]
    if decision_values is not None:
        uri = storage.join(out_dir, result_csv_name("decision_result", machine_type, section))
        written.append(storage.atomic_write_text(
            uri, _csv_text((n, str(d)) for n, d in zip(names, decision_values))))
    return written


def read_result_csv(uri: str) -> list[tuple[str, float]]:
    """Read a headerless ``file_name,value`` result file; blank lines are skipped."""
    rows = []
    for row in csv.reader(io.StringIO(storage.read_text(uri))):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise ValueError(f"{uri}: malformed line {row!r}")
        rows.append((row[0], float(row[1])))
    return rows
