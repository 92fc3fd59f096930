"""Augmentations of training batches (B, T, F): SpecAugment's time and frequency masks and
statistics exchange (StatEx). Mixup lives in the objective, which mixes the targets too."""

from __future__ import annotations

import torch
from torch import Tensor


def spec_augment(x: Tensor, cfg, generator: torch.Generator | None = None) -> Tensor:
    """Zero (= the normalised mean) random time and frequency bands of every clip of (B, T, F):
    ``cfg.time_masks`` bands of up to ``cfg.time_mask_width`` frames and ``cfg.freq_masks`` of up to
    ``cfg.freq_mask_width`` bins (SpecAugment without time warping)."""
    x = x.clone()
    B, T, Fq = x.shape
    for count, width, axis, size in ((cfg.time_masks, cfg.time_mask_width, 1, T),
                                     (cfg.freq_masks, cfg.freq_mask_width, 2, Fq)):
        if count <= 0 or width <= 0:
            continue
        w = torch.randint(0, min(width, size) + 1, (B, count), generator=generator)
        start = (torch.rand(B, count, generator=generator) * (size - w + 1).float()).long()
        pos = torch.arange(size)
        band = ((pos[None, None, :] >= start[..., None]) & (pos[None, None, :] < (start + w)[..., None])).any(dim=1)
        band = band.to(x.device)
        x = x.masked_fill(band[:, :, None] if axis == 1 else band[:, None, :], 0.0)
    return x


def statistics_exchange(x: Tensor, partner: Tensor, eps: float = 1e-5) -> Tensor:
    """Every frame of ``x`` (B, T, F) standardised over its F bins, then given the mean and standard
    deviation over F of the same frame of ``partner`` (B, T, F): one clip's spectral detail under
    another clip's frame-level statistics (StatEx, Wilkinghoff, ICASSP 2024)."""
    mu, sd = x.mean(dim=2, keepdim=True), x.std(dim=2, keepdim=True)
    return (x - mu) / (sd + eps) * partner.std(dim=2, keepdim=True) + partner.mean(dim=2, keepdim=True)


__all__ = ["spec_augment", "statistics_exchange"]
