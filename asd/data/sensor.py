"""Sensor-fault checks of one decoded clip: is it the machine, or the microphone?

A dead, saturated or failing microphone makes a clip that a detector scores like any other, often
as a strong anomaly. :func:`check` measures five things of a clip and names the faults it finds:

==============  =====================================================================================
``silent``      digital or near silence: the clip's RMS is below ``silence_dbfs`` (dB full scale)
``clipped``     saturation: at least ``clipped_share`` of the samples are at or near full scale
                (``|x| >= clip_level``)
``dropout``     a run of exact zeros at least ``dropout_min_s`` long inside the clip (between its
                first and last non-zero sample): the signal stopped and came back
``dc_offset``   the clip's mean is at least ``dc_offset`` of full scale away from zero
``short``       the clip is shorter than ``short_fraction`` of its machine type's usual length
                (the median length of that type's clips, given by the caller)
==============  =====================================================================================

A faulty clip is still featurized and scored (a failing sensor is news too); the faults travel
with its features (``asd.stores.features``: ``faults`` and the measurements below) and reports
list them apart from anomalies. The checks run on the decoded samples at the file's own sample
rate, before resampling (which would smear exact zeros and full-scale runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from asd.data.audio import SILENT

CLIPPED = "clipped"
DROPOUT = "dropout"
DC_OFFSET = "dc_offset"
SHORT = "short"
FAULTS = (SILENT, CLIPPED, DROPOUT, DC_OFFSET, SHORT)  # in the order they are reported

# what the faults mean, for reports and pages
DESCRIPTIONS = {
    SILENT: "silent (RMS below the floor)",
    CLIPPED: "clipped (samples at full scale)",
    DROPOUT: "dropout (a run of exact zeros inside the clip)",
    DC_OFFSET: "DC offset (mean away from zero)",
    SHORT: "short (much shorter than its machine's usual length)",
}


@dataclass
class SensorConfig:
    """Thresholds of the sensor-fault checks (``featurize.sensor`` in the job configs).

    The defaults flag none of the generated corpora's clips nor the real DCASE clips of
    ``ASD_REAL_DATA`` (the quietest near -46 dBFS, no zero run over 1 ms, no |mean| over 0.006).
    """

    enabled: bool = True
    silence_dbfs: float = -60.0  # RMS below this (dB full scale) is silence; 16-bit digital silence is -inf
    clip_level: float = 0.999  # a sample with |x| at or above this is at full scale
    clipped_share: float = 0.001  # at least this share of samples at full scale is clipping (0.1 %)
    dropout_min_s: float = 0.01  # a run of exact zeros this long (10 ms) inside the clip is a dropout
    dc_offset: float = 0.02  # |mean| at or above this share of full scale is a DC offset
    short_fraction: float = 0.5  # shorter than this share of the machine type's usual length is short
    probe_clips: int = 5  # clips whose headers are read for a type's usual length when no store knows it


@dataclass
class SensorReport:
    """What :func:`check` measured on one clip, and the faults it found (names of :data:`FAULTS`)."""

    rms_dbfs: float
    clipped_share: float
    longest_zero_run_s: float
    dc_offset: float
    faults: list[str] = field(default_factory=list)


def rms_dbfs(wave: np.ndarray) -> float:
    """The RMS of ``wave`` in dB full scale (``-inf`` for digital silence)."""
    if wave.size == 0:
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return 20.0 * float(np.log10(rms)) if rms > 0 else float("-inf")


def longest_inner_zero_run(wave: np.ndarray) -> int:
    """The longest run of exact zeros between the first and the last non-zero sample (samples)."""
    nonzero = np.flatnonzero(wave != 0)
    if nonzero.size < 2:
        return 0
    gaps = np.diff(nonzero) - 1  # zeros between consecutive non-zero samples
    return int(gaps.max())


def check(wave: np.ndarray, sample_rate: int, usual_s: float | None = None,
          cfg: SensorConfig | None = None) -> SensorReport:
    """Measure one mono clip (float samples, full scale 1.0) and name its faults.

    ``usual_s``: the usual length of the clip's machine type in seconds (``None``: not known, the
    ``short`` check is skipped)."""
    cfg = cfg or SensorConfig()
    x = np.asarray(wave, dtype=np.float32)
    level = rms_dbfs(x)
    share = float(np.mean(np.abs(x) >= cfg.clip_level)) if x.size else 0.0
    run_s = longest_inner_zero_run(x) / float(sample_rate)
    mean = float(np.mean(x, dtype=np.float64)) if x.size else 0.0
    faults = []
    if not level >= cfg.silence_dbfs:  # -inf included
        faults.append(SILENT)
    if share >= cfg.clipped_share:
        faults.append(CLIPPED)
    if SILENT not in faults and run_s >= cfg.dropout_min_s:  # a silent clip is silent, not a dropout
        faults.append(DROPOUT)
    if abs(mean) >= cfg.dc_offset:
        faults.append(DC_OFFSET)
    if usual_s and x.size / float(sample_rate) < cfg.short_fraction * usual_s:
        faults.append(SHORT)
    return SensorReport(rms_dbfs=level, clipped_share=share, longest_zero_run_s=run_s, dc_offset=mean, faults=faults)


__all__ = ["CLIPPED", "DC_OFFSET", "DESCRIPTIONS", "DROPOUT", "FAULTS", "SHORT", "SILENT", "SensorConfig",
           "SensorReport", "check", "longest_inner_zero_run", "rms_dbfs"]
