"""The pictures and sounds of a triage page (:mod:`asd.reports.triage`): a clip's log-mel
spectrogram beside its nearest normal clip's, the anomaly rate of the last nights, and WAV copies a
browser plays.

Figures are drawn on :class:`matplotlib.figure.Figure` objects (no pyplot state) with the Agg
backend, small (100 dpi) so that a page of ten anomalies stays well under a megabyte of images.
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
FRAME_S = 0.01  # the log-mel frame shift (asd.data.frontend.FbankConfig: 10 ms)


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def spectrogram_png(clip: np.ndarray, normal: np.ndarray | None, normal_note: str = "") -> bytes:
    """The clip's log-mel matrix ``(frames, mel bins)`` beside its nearest normal clip's, on one
    colour scale (the clip's); ``normal`` None: the right panel says ``normal_note`` instead."""
    fig = Figure(figsize=(7.2, 1.9), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    lo, hi = np.percentile(clip, [1, 99.5]) if clip.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    for ax, mat, title in ((left, clip, "this clip"), (right, normal, "nearest normal clip")):
        ax.set_title(title, fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        if mat is None:
            ax.set_xticks([])
            ax.text(0.5, 0.5, normal_note or "no normal clip", transform=ax.transAxes, ha="center", va="center",
                    fontsize=8, wrap=True, color="0.3")
            continue
        ax.imshow(mat.T, origin="lower", aspect="auto", cmap="magma", vmin=lo, vmax=hi, interpolation="nearest",
                  extent=(0.0, mat.shape[0] * FRAME_S, 0, mat.shape[1]))
        ax.set_xlabel("s", fontsize=7, labelpad=1)
    left.set_ylabel("mel bin", fontsize=7)
    return png_bytes(fig)


def trend_png(nights: list[str], rates: dict[str, list[float | None]]) -> bytes:
    """Anomaly rate (%) per machine type over ``nights`` (``rates[type][i]``: None where the type
    had no clips that night)."""
    fig = Figure(figsize=(7.2, 2.6), layout="constrained")
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
