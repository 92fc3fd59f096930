"""A small 1-D CNN over the modulation spectrum: the encoder for faults that show as rhythm.

Many machine faults change how the energy of a frequency band *fluctuates* rather than which
frequencies sound: bearing defect impulses at BPFO/BPFI, a cracked gear tooth once per turn,
imbalance at the shaft rate, valve timing. The featurize stage stores, per clip, the modulation
spectrum of 16 band-energy envelopes up to 250 Hz (:class:`asd.data.frontend.ModulationConfig`,
feature matrix ``mod``: ``(bins, bands)``); :class:`ModEncoder` classifies the same (machine
type, section, attribute) classes as :class:`asd.models.cnn.CNNEncoder` from it, and its
embedding is concatenated with the log-mel CNN's at scoring time (the ``concat`` embedder of
:mod:`asd.models.embedders`): the two see different evidence, and separately trained they are
better together than either alone (``benchmarks/results/accuracy.md``).

Reading it top to bottom::

    mod (B, bins, bands), log magnitudes  ->  standardised per value (running statistics)
    -> (B, bands, bins): the bands are channels, modulation frequency is the conv axis
    conv blocks, each: 1-D conv (kernel, stride 2) - BN - ReLU   -> (B, c_last, bins / 2^n)
    adaptive max pool over modulation frequency to ``pooled`` positions
    flatten -> linear -> batch norm                                  -> (B, embed_dim)

The input standardisation keeps running means per value and one pooled standard deviation,
updated on every training batch and used as they stand (also in training), so the checkpoint
carries the statistics of its training data and nothing outside the model normalises ``mod``.
The encoder takes the whole matrix: ``min_frames`` is ``bins`` and training crops are the full
``bins`` rows (``crop_frames = bins``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

ARCH = "mod"
INPUT = "mod"  # the feature matrix this encoder reads (asd.stores.features.MATRICES)


@dataclass
class ModConfig:
    arch: str = ARCH
    bands: int = 16  # input channels: ModulationConfig.bands
    bins: int = 256  # input length: ModulationConfig.bins
    channels: tuple[int, ...] = (32, 64, 64, 128)  # one strided conv block each
    kernel: int = 7
    pooled: int = 16  # positions left by the adaptive max pool
    embed_dim: int = 128

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.arch != ARCH:
            raise ValueError(f"ModConfig.arch must be {ARCH!r}, got {self.arch!r}")
        if not self.channels or min(self.channels) < 1 or self.bands < 1 or self.embed_dim < 1:
            raise ValueError(f"mod encoder: channels, bands and embed_dim must be positive (got {self})")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and positive, got {self.kernel}")
        if self.bins // 2 ** len(self.channels) < 1 or self.pooled < 1:
            raise ValueError(f"{len(self.channels)} stride-2 blocks leave nothing of {self.bins} bins")

    @property
    def min_frames(self) -> int:
        return self.bins


class RunningStandardize(nn.Module):
    """``(x - mean) / std`` with a running mean per value and one pooled std, accumulated over
    every training batch (a cumulative average) and always applied from the running values."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("sq_mean", torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                n = float(x.shape[0])
                total = self.count + n
                w = (n / total).to(x.dtype)
                self.mean.mul_(1 - w).add_(w * x.mean(dim=0))
                self.sq_mean.mul_(1 - w).add_(w * (x * x).mean(dim=0))
                self.count.copy_(total)
        var = (self.sq_mean - self.mean**2).clamp_min(0).mean()
        return (x - self.mean) / var.clamp_min(1e-8).sqrt()


class ModEncoder(nn.Module):
    """Modulation spectra ``(B, bins, bands)`` -> embeddings ``(B, embed_dim)`` (module docstring)."""

    input = INPUT

    def __init__(self, cfg: ModConfig | None = None):
        super().__init__()
        self.cfg = cfg or ModConfig()
        c = self.cfg
        self.standardize = RunningStandardize((c.bins, c.bands))
        blocks, c_in = [], c.bands
        for c_out in c.channels:
            blocks += [nn.Conv1d(c_in, c_out, c.kernel, stride=2, padding=c.kernel // 2, bias=False),
                       nn.BatchNorm1d(c_out), nn.ReLU()]
            c_in = c_out
        self.convs = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool1d(c.pooled)
        self.proj = nn.Linear(c_in * c.pooled, c.embed_dim, bias=False)
        self.norm = nn.BatchNorm1d(c.embed_dim)
        self.meta: dict = {}

    @property
    def min_frames(self) -> int:
        return self.cfg.min_frames

    def forward(self, mod: Tensor) -> Tensor:
        if tuple(mod.shape[1:]) != (self.cfg.bins, self.cfg.bands):
            raise ValueError(f"expected modulation spectra of shape (B, {self.cfg.bins}, {self.cfg.bands}), "
                             f"got {tuple(mod.shape)}")
        x = self.standardize(mod).transpose(1, 2)  # (B, bands, bins)
        x = self.pool(self.convs(x))
        return self.norm(self.proj(x.flatten(1)))

    def embed(self, mod: Tensor, layer: int | None = None, pool: str = "mean",
              padding_mask: Tensor | None = None) -> Tensor:
        """The embedding of every clip (the encoder interface of the stages)."""
        if layer is not None or pool != "mean" or padding_mask is not None:
            raise ValueError("a mod encoder has one embedding: layer=None, pool='mean', no padding mask "
                             f"(got layer={layer!r}, pool={pool!r})")
        return self.forward(mod)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["ARCH", "INPUT", "ModConfig", "ModEncoder", "RunningStandardize"]
