"""The DCASE autoencoder baseline's settings (:class:`AEConfig`), network (:class:`AENet`, one per
machine type, :class:`AEBank` for all types in one run), training objective and a trained type
(:class:`TypeModel`: network, offset, BatchNorm recalibration, Mahalanobis covariances). See
:mod:`asd.baselines.autoencoder` for the recipe and every difference from the official code."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn

from asd.data.frontend import FbankConfig
from asd.stores.features import (
    matrix_arrays,
    matrix_columns,
)
from asd.training.loop import ObjectiveBase, TrainConfig

log = logging.getLogger(__name__)

DB_PER_NEPER = 10.0 / math.log(10.0)  # natural log of power -> decibels
FEATURE_COLUMNS = matrix_columns("fbank")
REDUCTIONS = ("mean_error", "mean_distance")

# ----------------------------------------------------------------------------- config


@dataclass
class AEConfig:
    """The baseline's front end, network, scores and their settings (see the module docstring)."""

    tag: str = "ae"  # models/<tag>/ and the Ray Train run checkpoints/<tag>
    # front end (featurize stage settings of the second feature set)
    n_mels: int = 128
    frame_length_ms: float = 64.0  # 1024 samples at 16 kHz -> 1024-point FFT
    frame_shift_ms: float = 32.0  # hop 512
    sample_rate: int = 16000
    frames: int = 5  # context: 5 frames -> 640 values
    vector_hop: int = 1  # context vectors at every frame
    # network
    hidden: int = 128
    layers: int = 4  # Linear-BN-ReLU layers of width `hidden` in the encoder; the decoder mirrors them
    bottleneck: int = 8
    bn_momentum: float = 0.01
    bn_eps: float = 1e-3
    center: bool = True  # subtract the type's scalar training mean (dB)
    batch_per_type: bool = True  # train.batch_size counts clips per machine type
    recalibrate_bn: bool = True
    recalibrate_vectors: int = 200_000  # random training vectors for the BN recalibration (at most)
    recalibrate_batch: int = 4096
    # scores
    maha_reduction: str = "mean_error"  # mean_error (official computation) | mean_distance
    maha_ridge: float = 1e-6  # x mean variance, added to the covariance diagonal
    threshold_q: float = 0.9
    # scoring actors
    score_batch_size: int = 32
    num_actors: int = 2
    num_cpus: float = 0.5

    def __post_init__(self):
        if self.frames < 1 or self.vector_hop < 1 or self.layers < 1 or self.hidden < 1 or self.bottleneck < 1:
            raise ValueError("frames, vector_hop, layers, hidden and bottleneck must be >= 1")
        if self.maha_reduction not in REDUCTIONS:
            raise ValueError(f"maha_reduction must be one of {REDUCTIONS}, got {self.maha_reduction!r}")
        if not 0.0 < self.threshold_q < 1.0:
            raise ValueError(f"threshold_q must be in (0, 1), got {self.threshold_q}")
        if self.maha_ridge < 0:
            raise ValueError("maha_ridge must be >= 0")

    @property
    def input_dim(self) -> int:
        return self.n_mels * self.frames

    def fbank(self) -> FbankConfig:
        """The front end as the featurize stage's filterbank settings (stored as float32)."""
        return FbankConfig(num_mel_bins=self.n_mels, frame_length_ms=self.frame_length_ms,
                           frame_shift_ms=self.frame_shift_ms, sample_rate=self.sample_rate, dither=0.0,
                           dtype="float32")


def default_train_config(**overrides) -> TrainConfig:
    """Ray Train settings for the baseline: Adam as published (lr 1e-3, no decay, constant rate, no
    warm-up, no clipping), 22 clips x 16-frame crops (264 context vectors) per step, one worker
    (the model is 0.2 M parameters: DDP would only add all-reduce time)."""
    base = dict(steps=1000, batch_size=22, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), warmup_steps=0,
                schedule="constant", grad_clip=0.0, num_workers=1, cpus_per_worker=1.0, bf16=False,
                crop_frames=16, checkpoint_every=500, num_to_keep=1, log_every=25, resume=False)
    base.update(overrides)
    return TrainConfig(**base)




# ----------------------------------------------------------------------------- model


class AENet(nn.Module):
    """The baseline's dense autoencoder on context vectors (``(N, frames * n_mels)`` -> same)."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.input_dim = cfg.input_dim

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Linear(i, o), nn.BatchNorm1d(o, momentum=cfg.bn_momentum, eps=cfg.bn_eps), nn.ReLU()]

        enc: list[nn.Module] = block(cfg.input_dim, cfg.hidden)
        for _ in range(cfg.layers - 1):
            enc += block(cfg.hidden, cfg.hidden)
        enc += block(cfg.hidden, cfg.bottleneck)
        dec: list[nn.Module] = block(cfg.bottleneck, cfg.hidden)
        for _ in range(cfg.layers - 1):
            dec += block(cfg.hidden, cfg.hidden)
        dec.append(nn.Linear(cfg.hidden, cfg.input_dim))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x.reshape(-1, self.input_dim)))


def context_vectors(x: torch.Tensor, frames: int, hop: int = 1) -> torch.Tensor:
    """``(B, T, F)`` frames -> ``(B, N, frames * F)`` context vectors (frame after frame, as the
    official ``file_to_vectors``), ``N = (T - frames) // hop + 1``."""
    if x.shape[1] < frames:
        raise ValueError(f"{x.shape[1]} frames are fewer than the {frames} of one context vector")
    win = x.unfold(1, frames, hop)  # (B, N, F, frames)
    return win.permute(0, 1, 3, 2).reshape(x.shape[0], win.shape[1], frames * x.shape[2])


def clip_vectors(fb: np.ndarray, frames: int, hop: int = 1) -> np.ndarray:
    """Context vectors ``(N, frames * F)`` of one clip's ``(T, F)`` frames; a clip shorter than one
    context is tiled (wrap-around), as the training crops are."""
    if fb.shape[0] < frames:
        fb = fb[np.arange(frames) % fb.shape[0]]
    win = np.lib.stride_tricks.sliding_window_view(fb, (frames, fb.shape[1]))[::hop, 0]  # (N, frames, F)
    return np.ascontiguousarray(win.reshape(win.shape[0], -1))


class AEBank(nn.Module):
    """One :class:`AENet` per machine type, side by side (``nets[str(i)]`` is ``types[i]``'s). A row
    goes only through its own type's network, so the networks are independent models."""

    def __init__(self, cfg: AEConfig, types: list[str]):
        super().__init__()
        self.types = list(types)
        self.nets = nn.ModuleDict({str(i): AENet(cfg) for i in range(len(self.types))})

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Reconstructions of context vectors ``x`` (M, D) whose rows belong to types ``index`` (M,)."""
        out = torch.empty_like(x)
        for i in torch.unique(index).tolist():
            rows = index == i
            out[rows] = self.nets[str(i)](x[rows]).to(out.dtype)
        return out


class AutoencoderObjective(ObjectiveBase):
    """The baseline's training objective for :func:`asd.training.fit.fit`: every type's autoencoder on the
    context vectors of its own clips' crops, loss = the sum over the types in the batch of each
    type's mean squared error (so each network gets exactly the gradient of its own MSE, as if it
    were trained alone). Crops arrive in dB (``norm``); the type's scalar ``offsets`` (dB) are
    subtracted here. Picklable; no state besides the networks."""

    name = "dcase_ae"
    columns: tuple[str, ...] = ("machine_type",)
    find_unused_parameters = True  # a type missing from one worker's batch leaves its network unused

    def __init__(self, cfg: AEConfig, types: list[str], offsets: dict[str, float] | None = None):
        if not types:
            raise ValueError("no machine types to train")
        self.cfg = cfg
        self.types = list(types)
        self.offsets = {t: float((offsets or {}).get(t, 0.0)) for t in self.types}

    def build(self) -> nn.Module:
        return AEBank(self.cfg, self.types)

    def step(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        fb = batch["fbank"]
        if fb.shape[-1] != self.cfg.n_mels:
            raise ValueError(f"features have {fb.shape[-1]} mel bins, the autoencoder expects {self.cfg.n_mels}")
        unknown = sorted(set(batch["machine_type"]) - set(self.types))
        if unknown:
            raise ValueError(f"training rows of machine types {unknown} have no autoencoder (types {self.types})")
        clip_type = [self.types.index(t) for t in batch["machine_type"]]
        offset = torch.tensor([self.offsets[self.types[i]] for i in clip_type], dtype=fb.dtype, device=fb.device)
        v = context_vectors(fb - offset[:, None, None], self.cfg.frames, self.cfg.vector_hop)  # (B, N, D)
        index = torch.tensor(clip_type, device=fb.device).repeat_interleave(v.shape[1])
        x = v.reshape(-1, self.cfg.input_dim)
        err = (model(x, index).float() - x.float()).pow(2).mean(dim=1)  # per vector
        present = torch.unique(index)
        loss = sum(err[index == i].mean() for i in present.tolist())
        return loss, {"types_in_batch": float(len(present))}

    def describe(self) -> dict:
        return {"objective": self.name, "ae": asdict(self.cfg), "types": self.types, "offsets": self.offsets}


# ----------------------------------------------------------------------------- a trained type


@dataclass
class TypeModel:
    """One machine type's trained autoencoder with its normalisation, covariances and thresholds."""

    machine_type: str
    cfg: AEConfig
    net: AENet
    norm: tuple[float, float]  # (mean, std) in crop_batch's form: (fbank - mean) / (2 * std)
    inv_cov_source: np.ndarray | None = None
    inv_cov_target: np.ndarray | None = None
    thresholds: dict = field(default_factory=dict)  # score name -> threshold
    info: dict = field(default_factory=dict)

    def errors(self, fb: np.ndarray) -> np.ndarray:
        """Reconstruction error rows ``(N * frames, n_mels)`` (float64) of one clip's frames."""
        if fb.shape[1] != self.cfg.n_mels:
            raise ValueError(f"{self.machine_type}: features have {fb.shape[1]} mel bins, model expects "
                             f"{self.cfg.n_mels}")
        x = (np.asarray(fb, np.float32) - self.norm[0]) / (2.0 * self.norm[1])
        v = torch.from_numpy(clip_vectors(x, self.cfg.frames, self.cfg.vector_hop))
        with torch.no_grad():
            recon = self.net(v)
        return (v - recon).double().numpy().reshape(-1, self.cfg.n_mels)

    def scores(self, fb: np.ndarray) -> dict[str, float]:
        """``mse``, ``maha_source``, ``maha_target`` and ``maha`` (their minimum) of one clip."""
        e = self.errors(fb)
        out = {"mse": float(np.mean(e**2))}
        if self.inv_cov_source is not None:
            s = mahalanobis_term(e, self.inv_cov_source, self.cfg.maha_reduction)
            t = mahalanobis_term(e, self.inv_cov_target, self.cfg.maha_reduction)
            out.update(maha_source=s, maha_target=t, maha=min(s, t))
        return out


def mahalanobis_term(errors: np.ndarray, precision: np.ndarray, reduction: str = "mean_error") -> float:
    """A clip's Mahalanobis term from its error rows: ``dbar^T P dbar`` (``mean_error``, the
    official computation) or ``mean_i d_i^T P d_i`` (``mean_distance``)."""
    if reduction == "mean_error":
        d = errors.mean(axis=0)
        return float(d @ precision @ d)
    if reduction == "mean_distance":
        return float(np.mean(np.einsum("ij,jk,ik->i", errors, precision, errors)))
    raise ValueError(f"unknown Mahalanobis reduction {reduction!r}; use one of {REDUCTIONS}")


class _Moments:
    """Streaming count, sum and outer-product sum of error rows (float64)."""

    def __init__(self, dim: int):
        self.n = 0
        self.s = np.zeros(dim)
        self.ss = np.zeros((dim, dim))

    def add(self, e: np.ndarray) -> None:
        self.n += e.shape[0]
        self.s += e.sum(axis=0)
        self.ss += e.T @ e

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("a covariance needs at least 2 error rows")
        mu = self.s / self.n
        return (self.ss - self.n * np.outer(mu, mu)) / (self.n - 1)


def inverse_covariance(cov: np.ndarray, ridge: float) -> np.ndarray:
    """``(cov + ridge * mean variance * I)^-1`` (the ridge keeps a small domain invertible)."""
    lam = ridge * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    return np.linalg.inv(cov + lam * np.eye(cov.shape[0]))


def _arrays(table: pa.Table) -> list[np.ndarray]:
    return matrix_arrays(table, "fbank")


def recalibrate_batchnorm(model: TypeModel, arrays: list[np.ndarray], seed: int = 0) -> int:
    """Recompute every BatchNorm's running statistics as plain averages over random batches of
    training context vectors (``cfg.recalibrate_batch`` each, at most ``cfg.recalibrate_vectors``
    in all); returns the number of vectors used."""
    cfg = model.cfg
    norm = [(np.asarray(a, np.float32) - model.norm[0]) / (2.0 * model.norm[1]) for a in arrays]
    norm = [a[np.arange(cfg.frames) % a.shape[0]] if a.shape[0] < cfg.frames else a for a in norm]
    counts = np.array([(a.shape[0] - cfg.frames) // cfg.vector_hop + 1 for a in norm])
    clip = np.repeat(np.arange(len(norm)), counts)
    start = np.concatenate([np.arange(c) * cfg.vector_hop for c in counts])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(clip))[: cfg.recalibrate_vectors]
    size = min(cfg.recalibrate_batch, len(order))
    n_batches = len(order) // size if size >= 2 else 0
    if n_batches == 0:
        return 0
    bns = [m for m in model.net.modules() if isinstance(m, nn.BatchNorm1d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.net.train()
    with torch.no_grad():
        for b in range(n_batches):
            idx = order[b * size : (b + 1) * size]
            x = np.stack([norm[c][s : s + cfg.frames].reshape(-1) for c, s in zip(clip[idx], start[idx])])
            model.net(torch.from_numpy(x))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.net.eval()
    return n_batches * size


__all__ = ["AEBank", "AEConfig", "AENet", "AutoencoderObjective", "TypeModel", "clip_vectors", "context_vectors",
           "default_train_config", "inverse_covariance", "mahalanobis_term", "recalibrate_batchnorm"]
