"""Markdown tables of the DCASE Task 2 metrics (:class:`asd.reports.metrics.MetricsResult`): one
run's table per machine type and section, and several methods side by side. Percent with 2
decimals; a value that cannot be computed prints as ``n/a``."""

from __future__ import annotations

import math
from typing import Any, Sequence

from asd.reports.metrics import MAX_FPR, MetricsResult, harmonic_mean

__all__ = ["metrics_markdown", "methods_markdown", "pct"]


def pct(value: float | None) -> str:
    """A [0, 1] value as a percentage with 2 decimals; None or NaN -> ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100.0 * value:.2f}"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |"


_SECTION_COLUMNS = (
    ("AUC-s", "auc_source"),
    ("AUC-t", "auc_target"),
    ("pAUC", "pauc"),
    ("pAUC-s", "pauc_source"),
    ("pAUC-t", "pauc_target"),
)


def metrics_markdown(result: MetricsResult, title: str | None = None) -> str:
    """One Markdown table of a run's metrics, in percent with 2 decimals.

    Rows: one per machine type/section, then per machine type a ``hmean`` row
    (column-wise harmonic means over that type's sections). Columns: AUC-s,
    AUC-t, pAUC (official), pAUC-s, pAUC-t (extra) and ``hmean`` (of the row's
    AUC-s, AUC-t, pAUC; on a type's hmean row it is the type's score
    ``result.per_type``). Ends with the ``official score (hmean)`` line.
    NaN values (not computable) print as ``n/a``.
    """
    lines: list[str] = []
    if title:
        lines += [f"### {title}", ""]
    header = ["machine type", "section"] + [f"{name} (%)" for name, _ in _SECTION_COLUMNS] + ["hmean (%)"]
    lines.append(_md_row(header))
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
    for mtype in result.machine_types:
        secs = result.sections_of(mtype)
        for s in secs:
            lines.append(_md_row(
                [mtype, s.section] + [pct(getattr(s, attr)) for _, attr in _SECTION_COLUMNS]
                + [pct(s.hmean)]))
        col_hmeans = [harmonic_mean(getattr(s, attr) for s in secs) for _, attr in _SECTION_COLUMNS]
        lines.append(_md_row(
            [f"**{mtype}**", "**hmean**"] + [pct(v) for v in col_hmeans]
            + [f"**{pct(result.per_type.get(mtype, float('nan')))}**"]))
    n_values = sum(
        1 for s in result.sections for v in s.official_values() if not math.isnan(v))
    lines += [
        "",
        f"**official score (hmean): {pct(result.official_score)} %** "
        f"(harmonic mean of {n_values} values: AUC-s, AUC-t and pAUC of every machine type "
        f"and section; pAUC with max FPR {MAX_FPR:g})",
    ]
    return "\n".join(lines) + "\n"


def _type_column_hmean(result: MetricsResult, mtype: str | None, attr: str) -> float:
    secs = result.sections if mtype is None else result.sections_of(mtype)
    return harmonic_mean(getattr(s, attr) for s in secs)


def methods_markdown(results: dict[str, MetricsResult]) -> str:
    """Methods side by side, one Markdown table.

    Rows: machine types (union over methods, sorted) and a final ``hmean
    (all)`` row. Per method four columns: AUC-s, AUC-t, pAUC (each the hmean
    over the type's sections, or over all sections in the last row) and
    ``score`` (the type's ``per_type`` hmean; in the last row the official
    score). Percent with 2 decimals; ``n/a`` when a method lacks a type.
    """
    methods = list(results)
    types = sorted({t for r in results.values() for t in r.machine_types})
    cols = (("AUC-s", "auc_source"), ("AUC-t", "auc_target"), ("pAUC", "pauc"))
    header = ["machine type"]
    for m in methods:
        header += [f"{m} {name}" for name, _ in cols] + [f"{m} score"]
    lines = [_md_row(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for mtype in types:
        row: list[str] = [mtype]
        for m in methods:
            r = results[m]
            if mtype not in r.machine_types:
                row += ["n/a"] * (len(cols) + 1)
                continue
            row += [pct(_type_column_hmean(r, mtype, attr)) for _, attr in cols]
            row.append(pct(r.per_type.get(mtype, float("nan"))))
        lines.append(_md_row(row))
    last: list[str] = ["**hmean (all)**"]
    for m in methods:
        r = results[m]
        last += [pct(_type_column_hmean(r, None, attr)) for _, attr in cols]
        last.append(f"**{pct(r.official_score)}**")
    lines.append(_md_row(last))
    return "\n".join(lines) + "\n"
