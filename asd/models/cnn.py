"""A small residual CNN over log-mel crops: the CPU-scale encoder for attribute classification.

DCASE systems that learn machine-specific structure from scratch (outlier exposure with margin
losses on (section, attribute) classes) use small CNNs on spectrograms; at the scale one CPU box
trains, such a network is a far cheaper and stronger starting point than a transformer that has
seen little audio. :class:`CNNEncoder` is that network, with the interface the stages use from an
encoder (``cfg``, ``meta``, ``embed``, ``min_frames``), so fine-tuning, embedding and scoring take
it wherever they take :class:`asd.models.encoder.AudioEncoder`.

Reading it top to bottom::

    fbank (B, T, F) normalised  ->  (B, 1, F, T)
    stem: 3x3 conv, stride (2, 2)                      -> (B, c0, F/2, T/2)
    residual blocks, each: 3x3 conv - BN - ReLU - 3x3 conv - BN, + shortcut, ReLU;
        block i > 0 halves frequency and time          -> (B, c_last, F', T')
    pool over time (mean and max, per channel and frequency row: the frequency layout stays)
    flatten -> linear -> batch norm                    -> (B, embed_dim)   the embedding

The embedding is what the margin head classifies and what kNN scoring uses. ``pool`` is accepted
for the encoder interface and must be ``mean`` (the only pooling the head was trained on);
``layer`` must be None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ARCH = "cnn"


@dataclass
class CNNConfig:
    arch: str = ARCH
    n_mels: int = 128
    channels: tuple[int, ...] = (16, 16, 32, 64, 128)  # stem, then one residual block per entry after it
    embed_dim: int = 128
    time_pool: str = "meanmax"  # mean | max | meanmax (over time, per channel and frequency row)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.arch != ARCH:
            raise ValueError(f"CNNConfig.arch must be {ARCH!r}, got {self.arch!r}")
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise ValueError(f"channels needs a stem and at least one block, got {self.channels}")
        if self.time_pool not in ("mean", "max", "meanmax"):
            raise ValueError(f"time_pool must be mean, max or meanmax, got {self.time_pool!r}")

    @property
    def freq_rows(self) -> int:
        """Frequency rows left after the stem and the striding blocks."""
        rows = math.ceil(self.n_mels / 2)
        for _ in self.channels[2:]:
            rows = math.ceil(rows / 2)
        return rows

    @property
    def min_frames(self) -> int:
        """Shortest input that leaves at least one time step at the end."""
        return 2 ** (len(self.channels) - 1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class CNNEncoder(nn.Module):
    """Log-mel crops ``(B, T, F)`` -> embeddings ``(B, embed_dim)`` (see the module docstring)."""

    input = "fbank"  # the feature matrix it reads (asd.stores.features.MATRICES)

    def __init__(self, cfg: CNNConfig | None = None):
        super().__init__()
        self.cfg = cfg or CNNConfig()
        c = self.cfg.channels
        self.stem = nn.Sequential(nn.Conv2d(1, c[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c[0]),
                                  nn.ReLU())
        self.blocks = nn.ModuleList(ResBlock(c[i], c[i + 1], stride=1 if i == 0 else 2) for i in range(len(c) - 1))
        pooled = c[-1] * self.cfg.freq_rows * (2 if self.cfg.time_pool == "meanmax" else 1)
        self.proj = nn.Linear(pooled, self.cfg.embed_dim, bias=False)
        self.norm = nn.BatchNorm1d(self.cfg.embed_dim)
        self.meta: dict = {}

    @property
    def min_frames(self) -> int:
        return self.cfg.min_frames

    def forward(self, fbank: Tensor) -> Tensor:
        if fbank.shape[-1] != self.cfg.n_mels:
            raise ValueError(f"expected {self.cfg.n_mels} mel bins, got input of shape {tuple(fbank.shape)}")
        x = self.stem(fbank.transpose(1, 2).unsqueeze(1))  # (B, 1, F, T) -> (B, c0, F/2, T/2)
        for block in self.blocks:
            x = block(x)
        if self.cfg.time_pool == "mean":
            x = x.mean(dim=3)
        elif self.cfg.time_pool == "max":
            x = x.amax(dim=3)
        else:
            x = torch.cat([x.mean(dim=3), x.amax(dim=3)], dim=1)
        return self.norm(self.proj(x.flatten(1)))

    def embed(self, fbank: Tensor, layer: int | None = None, pool: str = "mean",
              padding_mask: Tensor | None = None) -> Tensor:
        """The embedding of every clip of ``fbank`` (the encoder interface of the stages)."""
        if layer is not None or pool != "mean" or padding_mask is not None:
            raise ValueError("a CNN encoder has one embedding: layer=None, pool='mean', no padding mask "
                             f"(got layer={layer!r}, pool={pool!r})")
        return self.forward(fbank)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["ARCH", "CNNConfig", "CNNEncoder", "ResBlock"]
