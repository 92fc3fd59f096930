"""Decision thresholds from (normal) training anomaly scores: the DCASE baseline's gamma fit and its
``q``-quantile, or a plain empirical quantile (:func:`fit_threshold`). Scoring fits one per machine
type and section on leave-one-out training scores (:meth:`asd.algorithms.knn.MemoryBank.train_scores`)."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["fit_threshold"]


def fit_threshold(
    train_scores: np.ndarray,
    method: str = "gamma",
    q: float = 0.9,
    *,
    fix_loc: bool = True,
) -> float:
    """Decision threshold from (normal) training anomaly scores.

    Args:
        train_scores: training scores, e.g. from :meth:`MemoryBank.train_scores`.
            Non-finite values (``inf`` from empty banks, NaN) are ignored.
        method: ``"gamma"`` (DCASE baseline: fit a gamma distribution, take its
            ``q``-quantile) or ``"percentile"`` (``np.quantile(scores, q)``).
        q: quantile in ``(0, 1)``; DCASE uses 0.9.
        fix_loc: gamma only. ``True`` (default) fits shape and scale with the location
            fixed at 0, after shifting the scores to be strictly positive if any are
            ``<= 0`` (the shift is undone on the result); this 2-parameter MLE is
            stable. ``False`` does the DCASE baseline's free 3-parameter
            ``scipy.stats.gamma.fit(scores)``.

    The gamma method falls back to the empirical quantile, with a logged warning,
    when there are fewer than 3 finite scores, the scores are all equal, or the fit
    fails or yields a non-finite threshold.

    Raises:
        ValueError: unknown method, ``q`` outside ``(0, 1)``, or no finite scores.
    """
    if method not in ("gamma", "percentile"):
        raise ValueError(f"unknown threshold method {method!r}; use 'gamma' or 'percentile'")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    scores = np.asarray(train_scores, dtype=np.float64).ravel()
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        raise ValueError("no finite training scores to fit a threshold on")
    empirical = float(np.quantile(finite, q))
    if method == "percentile":
        return empirical

    if finite.size < 3 or np.ptp(finite) == 0.0:
        logger.warning(
            "gamma threshold fit needs >= 3 distinct finite scores (got %d, range %.3g); "
            "using the empirical %.3g-quantile",
            finite.size, float(np.ptp(finite)), q,
        )
        return empirical
    try:
        threshold = _gamma_quantile(finite, q, fix_loc)
    except Exception as exc:  # scipy raises various errors on bad fits
        logger.warning("gamma threshold fit failed (%s); using the empirical %.3g-quantile", exc, q)
        return empirical
    if not math.isfinite(threshold):
        logger.warning("gamma threshold fit gave %r; using the empirical %.3g-quantile", threshold, q)
        return empirical
    return threshold


def _gamma_quantile(x: np.ndarray, q: float, fix_loc: bool) -> float:
    """``q``-quantile of a gamma distribution fitted to ``x`` (see :func:`fit_threshold`)."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if not fix_loc:
            shape, loc, scale = stats.gamma.fit(x)
            return float(stats.gamma.ppf(q, shape, loc=loc, scale=scale))
        shift = 0.0
        if x.min() <= 0.0:
            # make the smallest score a small positive number (log(0) breaks the MLE)
            shift = -float(x.min()) + max(1e-6, 1e-3 * float(np.std(x)))
        shape, _, scale = stats.gamma.fit(x + shift, floc=0.0)
        if not (shape > 0 and scale > 0):
            raise RuntimeError(f"degenerate gamma parameters shape={shape}, scale={scale}")
        return float(stats.gamma.ppf(q, shape, loc=0.0, scale=scale)) - shift
