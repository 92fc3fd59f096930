"""The pictures and sounds of a triage page (:mod:`asd.reports.triage`): a clip's log-mel
spectrogram beside its nearest normal clip's, the anomaly rate of the last nights, and WAV copies a
browser plays.

The spectrograms are pixels (a colour map over the matrix, a palette PNG: about 30 KB and a few
milliseconds each); the trend is a :class:`matplotlib.figure.Figure` (no pyplot state, Agg backend).
"""

from __future__ import annotations

import io
import sys

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # don't switch an interactive session's backend
    matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from asd.data import audio  # noqa: E402
from asd.io import storage  # noqa: E402

DPI = 100


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


PANEL_W = 360  # pixels per spectrogram panel (time is resampled to it; one pixel row per mel bin)
GAP = 10
COLOURS = 64  # palette of the spectrogram PNGs: three quarters of the bytes of full colour, no visible loss


def _panel(mat: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A log-mel matrix ``(frames, bins)`` as RGB pixels: low bins at the bottom, time left to right."""
    x = np.clip((mat.T[::-1] - lo) / (hi - lo), 0.0, 1.0)
    cols = np.linspace(0, x.shape[1] - 1, PANEL_W).round().astype(int) if x.shape[1] else np.zeros(0, int)
    rgb = matplotlib.colormaps["magma"](x[:, cols])[..., :3]
    return (rgb * 255).astype(np.uint8)


def spectrogram_png(clip: np.ndarray, normal: np.ndarray | None) -> bytes:
    """The clip's log-mel matrix ``(frames, mel bins)`` beside its nearest normal clip's (a grey
    panel where there is none), on one colour scale (the clip's): two panels of ``PANEL_W`` x bins
    pixels, drawn without a figure (about a hundredth of the time) and written as a palette PNG; the
    page labels them."""
    from PIL import Image

    lo, hi = (np.percentile(clip, [1, 99.5]) if clip.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1.0
    left = _panel(clip, lo, hi)
    right = _panel(normal, lo, hi) if normal is not None else np.full_like(left, 235)
    gap = np.full((left.shape[0], GAP, 3), 255, np.uint8)
    img = Image.fromarray(np.concatenate([left, gap, right], axis=1)).quantize(COLOURS)
    buf = io.BytesIO()
    img.save(buf, format="png", optimize=True)
    return buf.getvalue()


def trend_png(nights: list[str], rates: dict[str, list[float | None]]) -> bytes:
    """Anomaly rate (%) per machine type over ``nights`` (``rates[type][i]``: None where the type
    had no clips that night)."""
    fig = Figure(figsize=(7.2, 2.6))
    fig.subplots_adjust(left=0.08, right=0.99, top=0.96, bottom=0.2)
    ax = fig.add_subplot()
    x = np.arange(len(nights))
    for mt, values in sorted(rates.items()):
        y = np.array([np.nan if v is None else 100.0 * v for v in values], dtype=float)
        ax.plot(x, y, marker="o", ms=4, lw=1.5, label=mt)
    ax.set_xticks(x, [n[5:] for n in nights], fontsize=7, rotation=45 if len(nights) > 8 else 0)
    ax.set_ylabel("anomalies (% of clips)", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if rates:
        ax.legend(fontsize=7, ncols=min(4, len(rates)), loc="upper left")
    return png_bytes(fig)


def playable_wav(uri: str, max_s: float, sample_rate: int) -> tuple[bytes, bool]:
    """The clip at ``uri`` as a WAV every browser plays (mono, 16-bit PCM at ``sample_rate``),
    cut to its first ``max_s`` seconds; returns the bytes and whether it was cut. Raises
    FileNotFoundError when the clip is gone and :class:`asd.data.audio.AudioError` when it does not
    decode."""
    dec = audio.decode(storage.read_bytes(uri), target_sr=sample_rate)
    n = int(round(max_s * sample_rate))
    cut = dec.wave.size > n
    return audio.encode_wav(np.clip(dec.wave[:n], -1.0, 1.0), sample_rate, "PCM_16"), cut
