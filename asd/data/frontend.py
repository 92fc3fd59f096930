"""The front ends: what a clip's waveform becomes before any model sees it.

* :func:`compute_fbank` (:class:`FbankConfig`): the Kaldi-compatible log-mel filterbank that
  BEATs/EAT-style encoders and the log-mel CNN read (torchaudio's ``kaldi.fbank``), or, with
  ``kind: librosa``, the power mel spectrogram in dB that the DCASE autoencoder baseline computes
  with librosa (:func:`compute_mel_db`);
* :func:`compute_modulation` (:class:`ModulationConfig`): the band-energy modulation spectrum
  the modulation CNN reads (16 log-spaced band envelopes at 2 ms, their spectra up to 250 Hz);
* :func:`compute_spectrum` (:class:`SpectrumConfig`): the clip's long-term power spectrum at
  about 4 Hz resolution (Welch), the input of the training-free ``spectrum`` kNN branch.

Plain numpy/torch, no Ray and no storage: :mod:`asd.stages.featurize` runs them per clip inside Ray
tasks, benchmarks and tests call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asd import SAMPLE_RATE

FBANK_KINDS = ("kaldi", "librosa")


@dataclass
class FbankConfig:
    """The log-mel front end: ``kaldi`` (Kaldi-compatible filterbank, the input BEATs/EAT-style
    encoders expect) or ``librosa`` (the DCASE autoencoder baseline's mel spectrogram in dB)."""

    kind: str = "kaldi"
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    sample_rate: int = SAMPLE_RATE
    dither: float = 0.0
    dtype: str = "float16"  # storage dtype: float16 or float32


@dataclass
class ModulationConfig:
    """The modulation spectrum of a clip: how fast the energy of each frequency band fluctuates.

    Machine faults often show as periodic fluctuation rather than as a new spectral peak:
    bearing defect impulses at BPFO/BPFI (tens to hundreds of Hz), a cracked gear tooth once per
    revolution, valve timing, imbalance at the shaft rate. A 10 ms log-mel frame rate sees
    fluctuation up to 50 Hz only and averages faster ones away; this front end keeps them.

    Per clip: power STFT (``win`` samples, Hann, ``hop`` samples: 2 ms at 16 kHz, a 500 Hz
    envelope rate), ``bands`` log-spaced bands from ``fmin_hz`` to ``fmax_hz`` (FFT bins weighted
    by their overlap with a band, so narrow low bands are never empty), the log energy envelope
    of each band with its mean removed and a Hann taper, ``|rfft|`` of it, averaged into ``bins``
    equal bins over (0, ``max_hz``], log. Stored as a ``(bins, bands)`` matrix (columns ``mod``,
    ``mod_bins``, ``mod_bands``, ``mod_dtype``), 8 KiB a clip at the defaults, whatever the clip
    length: the input of :mod:`asd.models.modnet`.
    """

    enabled: bool = True
    bands: int = 16
    fmin_hz: float = 100.0
    fmax_hz: float = 7900.0
    win: int = 128
    hop: int = 32
    bins: int = 256  # modulation bins over (0, max_hz]; a multiple of 16 (training takes it whole)
    max_hz: float = 250.0  # at most half the envelope rate (sample_rate / hop / 2)
    dtype: str = "float16"

    def check(self, sample_rate: int) -> None:
        if self.bands < 1 or self.bins < 16 or self.bins % 16 or self.win < 8 or self.hop < 1:
            raise ValueError(f"modulation: bands >= 1, bins a multiple of 16, win >= 8, hop >= 1 (got {self})")
        if not 0 < self.fmin_hz < self.fmax_hz <= sample_rate / 2:
            raise ValueError(f"modulation: need 0 < fmin_hz < fmax_hz <= {sample_rate / 2} (got {self})")
        if not 0 < self.max_hz <= sample_rate / self.hop / 2:
            raise ValueError(f"modulation: max_hz must be in (0, {sample_rate / self.hop / 2}] (half the envelope "
                             f"rate at hop {self.hop}), got {self.max_hz}")


@dataclass
class SpectrumConfig:
    """The long-term power spectrum of a clip: Welch's average of the periodograms of ``n_fft``-sample
    Hann segments overlapping by half, in natural log, from ``fmin_hz`` to the Nyquist frequency.

    A log-mel frame smears a toy car's motor and gear harmonics into 128 bands; at 4 Hz a bin
    (``n_fft`` 4096 at 16 kHz) the spectrum keeps each harmonic's frequency and level, which move
    when a gear wears or a shaft runs out of true. Stored as a ``(bins, 1)`` matrix (columns
    ``spec``, ``spec_bins``, ``spec_dtype``), 4 KiB a clip at the defaults, whatever its length.
    """

    enabled: bool = True
    n_fft: int = 4096
    fmin_hz: float = 0.0
    dtype: str = "float16"

    def check(self, sample_rate: int) -> None:
        if self.n_fft < 16 or self.n_fft & (self.n_fft - 1):
            raise ValueError(f"spectrum.n_fft must be a power of two >= 16, got {self.n_fft}")
        if not 0 <= self.fmin_hz < sample_rate / 2:
            raise ValueError(f"spectrum.fmin_hz must be in [0, {sample_rate / 2}), got {self.fmin_hz}")

    def bins(self, sample_rate: int) -> int:
        return self.n_fft // 2 + 1 - int(np.ceil(self.fmin_hz * self.n_fft / sample_rate))


def compute_spectrum(wave: np.ndarray, sample_rate: int, cfg: SpectrumConfig) -> np.ndarray:
    """(bins, 1) float32 log Welch power spectrum of a mono waveform (see :class:`SpectrumConfig`);
    a clip shorter than ``n_fft`` is zero-padded to one segment."""
    from scipy.signal import welch

    x = np.asarray(wave, np.float64)
    if x.shape[0] < cfg.n_fft:
        x = np.pad(x, (0, cfg.n_fft - x.shape[0]))
    _, power = welch(x, fs=sample_rate, window="hann", nperseg=cfg.n_fft, noverlap=cfg.n_fft // 2)
    first = power.shape[0] - cfg.bins(sample_rate)
    return np.log(power[first:] + 1e-12).astype(np.float32)[:, None]


def compute_fbank(wave: np.ndarray, cfg: FbankConfig) -> np.ndarray:
    """(frames, num_mel_bins) float32 log-mel frames of a mono waveform in [-1, 1], of ``cfg.kind``."""
    if cfg.kind == "librosa":
        return compute_mel_db(wave, cfg)
    if cfg.kind != "kaldi":
        raise ValueError(f"fbank.kind must be one of {FBANK_KINDS}, got {cfg.kind!r}")
    import torch
    import torchaudio.compliance.kaldi as kaldi

    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None] * 32768.0
    fb = kaldi.fbank(
        x,
        num_mel_bins=cfg.num_mel_bins,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
        sample_frequency=cfg.sample_rate,
        dither=cfg.dither,
        htk_compat=True,
        window_type="hanning",
        use_energy=False,
    )
    return fb.numpy()


def compute_mel_db(wave: np.ndarray, cfg: FbankConfig) -> np.ndarray:
    """(frames, num_mel_bins) float32 power mel spectrogram in dB, as the DCASE 2023-2025 autoencoder
    baseline computes it with librosa 0.9: ``10 log10(max(mel, eps))`` of ``melspectrogram(y, sr,
    n_fft, hop_length, n_mels, power=2)``, that is centred frames (the signal reflect-padded by
    n_fft / 2 on both sides), a periodic Hann window, Slaney-scale mel filters with Slaney
    (area) normalisation from 0 Hz to sr / 2. ``frame_length_ms`` and ``frame_shift_ms`` give
    n_fft and the hop in samples (64 ms and 32 ms: 1024 and 512 at 16 kHz)."""
    import torch
    import torchaudio.functional as AF

    n_fft = int(round(cfg.frame_length_ms * cfg.sample_rate / 1000))
    hop = int(round(cfg.frame_shift_ms * cfg.sample_rate / 1000))
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop, window=torch.hann_window(n_fft, periodic=True), center=True,
                      pad_mode="reflect", return_complex=True).abs().pow(2)  # (n_fft // 2 + 1, frames)
    filters = AF.melscale_fbanks(n_freqs=n_fft // 2 + 1, f_min=0.0, f_max=cfg.sample_rate / 2,
                                 n_mels=cfg.num_mel_bins, sample_rate=cfg.sample_rate, norm="slaney",
                                 mel_scale="slaney")  # (n_freqs, n_mels)
    mel = filters.T @ spec
    return (10.0 * torch.log10(torch.clamp(mel, min=np.finfo(np.float64).eps))).T.numpy()


def _overlap_weights(lo: np.ndarray, hi: np.ndarray, centres: np.ndarray, width: float) -> np.ndarray:
    """(len(lo), len(centres)) share of each interval [lo, hi) covered by the cells
    [centre - width / 2, centre + width / 2), divided by the interval's width (averaging weights)."""
    a = np.maximum(lo[:, None], centres[None, :] - width / 2)
    b = np.minimum(hi[:, None], centres[None, :] + width / 2)
    return np.clip(b - a, 0.0, None) / (hi - lo)[:, None]


def compute_modulation(wave: np.ndarray, sample_rate: int, cfg: ModulationConfig) -> np.ndarray:
    """(cfg.bins, cfg.bands) float32 log modulation spectrum of a mono waveform (see :class:`ModulationConfig`)."""
    x = np.asarray(wave, np.float64)
    if x.shape[0] < cfg.win:
        x = np.pad(x, (0, cfg.win - x.shape[0]))
    n_frames = 1 + (x.shape[0] - cfg.win) // cfg.hop
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.win)[:: cfg.hop][:n_frames]
    power = np.abs(np.fft.rfft(frames * np.hanning(cfg.win), axis=1)) ** 2  # (n_frames, win/2 + 1)
    edges = np.geomspace(cfg.fmin_hz, cfg.fmax_hz, cfg.bands + 1)
    fft_hz = np.arange(power.shape[1]) * sample_rate / cfg.win
    band_w = _overlap_weights(edges[:-1], edges[1:], fft_hz, sample_rate / cfg.win)  # (bands, fft bins)
    env = np.log(power @ band_w.T + 1e-10)  # (n_frames, bands)
    env = (env - env.mean(axis=0)) * np.hanning(n_frames)[:, None]
    spec = np.abs(np.fft.rfft(env, axis=0))  # (n_frames // 2 + 1, bands)
    rate = sample_rate / cfg.hop
    spec[0] = 0.0  # the envelope's mean (removed above) is no modulation
    means = _interval_means(spec, rate / n_frames, np.linspace(0.0, cfg.max_hz, cfg.bins + 1))
    return np.log(means + 1e-6).astype(np.float32)


def _interval_means(values: np.ndarray, width: float, edges: np.ndarray) -> np.ndarray:
    """Means of a piecewise-constant function over [edges[k], edges[k + 1]): ``values[j]`` holds on
    the cell [(j - 1/2) width, (j + 1/2) width); beyond the last cell it is 0. (len(edges) - 1, B)."""
    n = values.shape[0]
    cum = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)]) * width
    pos = np.clip(edges / width + 0.5, 0.0, float(n))
    i = np.minimum(np.floor(pos).astype(int), n - 1)
    at = cum[i] + (pos - i)[:, None] * (cum[i + 1] - cum[i])
    return (at[1:] - at[:-1]) / np.diff(edges)[:, None]
