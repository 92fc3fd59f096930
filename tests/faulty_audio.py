"""Generated clips with one sensor fault each (and a healthy one), as a microphone would make them."""

from __future__ import annotations

import numpy as np

SR = 16000


def healthy(seconds: float = 2.0, seed: int = 0, sr: int = SR) -> np.ndarray:
    """A machine-like clip: a hum with harmonics and broadband noise, about -22 dBFS RMS."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    hum = sum(0.04 / h * np.sin(2 * np.pi * 120 * h * t + rng.uniform(0, 6.3)) for h in range(1, 6))
    return (hum + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def silent(seconds: float = 2.0, near: bool = False, seed: int = 0) -> np.ndarray:
    """Digital silence, or (``near``) a dead microphone's faint hiss at about -75 dBFS."""
    if not near:
        return np.zeros(int(seconds * SR), np.float32)
    return (0.00018 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def clipped(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """A healthy clip driven 30x too hot into the converter: flat tops at full scale."""
    return np.clip(30 * healthy(seconds, seed), -1.0, 1.0).astype(np.float32)


def dropout(seconds: float = 2.0, seed: int = 0, gap_s: float = 0.05) -> np.ndarray:
    """A healthy clip whose signal stops for ``gap_s`` in the middle (exact zeros) and comes back."""
    x = healthy(seconds, seed)
    start = x.size // 2
    x[start:start + int(gap_s * SR)] = 0.0
    return x


def dc_offset(seconds: float = 2.0, seed: int = 0, offset: float = 0.1) -> np.ndarray:
    """A healthy clip riding on a constant offset (a biased preamp)."""
    return (healthy(seconds, seed) + offset).astype(np.float32)


def short(seconds: float = 0.6, seed: int = 0) -> np.ndarray:
    """A healthy but truncated recording."""
    return healthy(seconds, seed)
