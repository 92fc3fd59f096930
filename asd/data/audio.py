"""Decoding WAV clips with soundfile, checks, resampling and downmixing.

torchaudio has no I/O backend here: bytes are decoded by soundfile (libsndfile),
and torchaudio is used only for resampling. Problems are raised as
:class:`AudioError` with a short machine-readable ``reason`` (used in quarantine
tables) and a human-readable message.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass, field

import numpy as np

from asd import SAMPLE_RATE

# reasons used in reports and quarantine tables
EMPTY = "empty"
NOT_WAV = "not_wav"
TRUNCATED = "truncated"
DECODE_ERROR = "decode_error"
TOO_SHORT = "too_short"
# a sensor fault (asd.data.sensor), not a quarantine reason: a silent clip is featurized and scored
SILENT = "silent"


class AudioError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class WavInfo:
    sample_rate: int
    channels: int
    num_frames: int
    subtype: str

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.sample_rate if self.sample_rate else 0.0


@dataclass
class Decoded:
    """A decoded clip: mono float32 at ``sample_rate`` plus what was done to get there (``mono``: the
    mono samples at the file's own rate ``source.sample_rate``, before resampling; the same array
    when no resampling was needed)."""

    wave: np.ndarray
    sample_rate: int
    source: WavInfo
    warnings: list[str] = field(default_factory=list)
    mono: np.ndarray | None = None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_riff(data: bytes) -> None:
    """Reject empty, non-WAV and truncated files before libsndfile papers over them."""
    if len(data) == 0:
        raise AudioError(EMPTY, "file is empty (0 bytes)")
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX", b"RF64") or data[8:12] != b"WAVE":
        head = data[:12]
        raise AudioError(NOT_WAV, f"not a RIFF/WAVE file (starts with {head!r})")
    if data[:4] == b"RF64":
        return  # sizes live in the ds64 chunk; libsndfile checks those
    # walk the chunks; the data chunk must be complete
    pos, end = 12, len(data)
    little = data[:4] == b"RIFF"
    fmt = "<I" if little else ">I"
    while pos + 8 <= end:
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack(fmt, data[pos + 4 : pos + 8])
        if chunk_id == b"data":
            available = end - pos - 8
            if size > available and size != 0xFFFFFFFF:
                raise AudioError(
                    TRUNCATED,
                    f"truncated: data chunk declares {size} bytes, only {available} present",
                )
            return
        pos += 8 + size + (size & 1)
    raise AudioError(TRUNCATED, "no complete 'data' chunk found (truncated or malformed WAV)")


def _soundfile():
    """soundfile (libsndfile), imported when audio is first decoded or encoded: modules that only
    read features (training, embedding, scoring) then run where no audio library is installed."""
    import soundfile

    return soundfile


def probe(data: bytes) -> WavInfo:
    """Header information of WAV bytes (raises :class:`AudioError`)."""
    _check_riff(data)
    sf = _soundfile()
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:  # libsndfile's own errors are RuntimeError / LibsndfileError
        raise AudioError(DECODE_ERROR, f"soundfile cannot read it: {exc}") from exc
    return WavInfo(int(info.samplerate), int(info.channels), int(info.frames), str(info.subtype))


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling with torchaudio (sinc interpolation)."""
    if orig_sr == target_sr:
        return wave
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), orig_sr, target_sr)
    return out.numpy()


def decode(
    data: bytes,
    target_sr: int = SAMPLE_RATE,
    min_duration_s: float = 0.0,
) -> Decoded:
    """Decode WAV bytes to mono float32 at ``target_sr``.

    Multichannel clips are averaged to mono and other sample rates are resampled,
    each with a warning string kept in the result (the manifest records them).
    Raises :class:`AudioError` for empty, non-WAV, truncated, undecodable or too
    short clips.
    """
    info = probe(data)
    if info.num_frames == 0:
        raise AudioError(EMPTY, "WAV has no audio frames")
    sf = _soundfile()
    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(DECODE_ERROR, f"soundfile cannot decode it: {exc}") from exc
    warnings: list[str] = []
    if wave.shape[1] > 1:
        warnings.append(f"downmixed {wave.shape[1]} channels to mono")
    wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    mono = wave
    if sr != target_sr:
        warnings.append(f"resampled {sr} Hz to {target_sr} Hz")
        wave = resample(wave, sr, target_sr)
    duration = len(wave) / target_sr
    if duration < min_duration_s:
        raise AudioError(TOO_SHORT, f"too short: {duration:.3f} s < minimum {min_duration_s:.3f} s")
    if not np.isfinite(wave).all():
        raise AudioError(DECODE_ERROR, "decoded samples contain NaN or inf")
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    return Decoded(wave, target_sr, info, warnings, mono=wave if sr == target_sr else mono)


def encode_wav(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, subtype: str = "PCM_16") -> bytes:
    """Float waveform(s) -> WAV bytes (``(n,)`` mono or ``(n, channels)``)."""
    buf = io.BytesIO()
    _soundfile().write(buf, wave, sample_rate, format="WAV", subtype=subtype)
    return buf.getvalue()
