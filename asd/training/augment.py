"""Augmentations of training batches (B, T, F): SpecAugment's time and frequency masks and
statistics exchange (StatEx). Mixup lives in the objective, which mixes the targets too."""

from __future__ import annotations

from torch import Tensor


def spec_augment(x: Tensor, cfg) -> Tensor:
    """SpecAugment's masks (no time warping) on every clip of (B, T, F), each clip its own draws
    (torchaudio's ``TimeMasking`` / ``FrequencyMasking`` with ``iid_masks``): ``cfg.time_masks``
    bands of up to ``cfg.time_mask_width`` frames and ``cfg.freq_masks`` of up to
    ``cfg.freq_mask_width`` bins set to zero (the normalised mean)."""
    from torchaudio.transforms import FrequencyMasking, TimeMasking

    masks = [TimeMasking(cfg.time_mask_width, iid_masks=True)] * max(0, cfg.time_masks) * (cfg.time_mask_width > 0)
    masks += [FrequencyMasking(cfg.freq_mask_width, iid_masks=True)] * max(0, cfg.freq_masks) * (cfg.freq_mask_width > 0)
    if not masks:
        return x
    spec = x.transpose(1, 2).unsqueeze(1)  # torchaudio's layout (B, 1, F, T); a new tensor, x is left alone
    for mask in masks:
        spec = mask(spec)
    return spec.squeeze(1).transpose(1, 2)


def statistics_exchange(x: Tensor, partner: Tensor, eps: float = 1e-5) -> Tensor:
    """Every frame of ``x`` (B, T, F) standardised over its F bins, then given the mean and standard
    deviation over F of the same frame of ``partner`` (B, T, F): one clip's spectral detail under
    another clip's frame-level statistics (StatEx, Wilkinghoff, ICASSP 2024)."""
    mu, sd = x.mean(dim=2, keepdim=True), x.std(dim=2, keepdim=True)
    return (x - mu) / (sd + eps) * partner.std(dim=2, keepdim=True) + partner.mean(dim=2, keepdim=True)


__all__ = ["spec_augment", "statistics_exchange"]
