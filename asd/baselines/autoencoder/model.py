"""The DCASE autoencoder baseline's settings (:class:`AEConfig`), network (:class:`AENet`), its
published training of one machine type (:func:`train_type`) and a trained type (:class:`TypeModel`:
network, Mahalanobis covariances, thresholds). See :mod:`asd.baselines.autoencoder` for the recipe."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn
import torch.nn.functional as F

from asd.data.frontend import FbankConfig
from asd.stores.features import matrix_arrays, matrix_columns

log = logging.getLogger(__name__)

FEATURE_COLUMNS = matrix_columns("fbank")
REDUCTIONS = ("mean_error", "mean_distance")


@dataclass
class AEConfig:
    """The baseline as published (``baseline.yaml`` of the DCASE 2023 baseline), and how it runs here."""

    tag: str = "ae"  # models/<tag>/
    # front end: librosa's mel spectrogram in dB (FbankConfig kind "librosa")
    n_mels: int = 128
    n_fft: int = 1024
    hop_length: int = 512
    sample_rate: int = 16000
    frames: int = 5  # context: 5 frames -> 640 values
    vector_hop: int = 1  # context vectors at every frame
    # network
    hidden: int = 128
    layers: int = 4  # Linear-BN-ReLU layers of width `hidden` in the encoder; the decoder mirrors them
    bottleneck: int = 8
    bn_momentum: float = 0.01
    bn_eps: float = 1e-3
    # training: every context vector of every training clip, this share held out, epochs x Adam
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    validation_split: float = 0.1
    seed: int = 13711  # baseline.yaml's
    train_cpus: float = 1.0  # per machine-type training task (its torch threads)
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
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError("epochs must be >= 1, batch_size >= 2 and lr > 0")
        if not 0.0 <= self.validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1), got {self.validation_split}")
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
        return FbankConfig(kind="librosa", num_mel_bins=self.n_mels,
                           frame_length_ms=1000.0 * self.n_fft / self.sample_rate,
                           frame_shift_ms=1000.0 * self.hop_length / self.sample_rate, sample_rate=self.sample_rate,
                           dither=0.0, dtype="float32")


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


def clip_vectors(fb: np.ndarray, frames: int, hop: int = 1) -> np.ndarray:
    """Context vectors ``(N, frames * F)`` of one clip's ``(T, F)`` frames, frame after frame as the
    official ``file_to_vectors``; a clip shorter than one context is tiled (wrap-around)."""
    if fb.shape[0] < frames:
        fb = fb[np.arange(frames) % fb.shape[0]]
    win = np.lib.stride_tricks.sliding_window_view(fb, (frames, fb.shape[1]))[::hop, 0]  # (N, frames, F)
    return np.ascontiguousarray(win.reshape(win.shape[0], -1))


# ----------------------------------------------------------------------------- training one type


def train_type(arrays: list[np.ndarray], cfg: AEConfig) -> tuple[AENet, dict]:
    """The published training of one machine type's autoencoder, in this process: every context
    vector of every training clip; ``validation_split`` of them held out at random (their loss is
    reported, never trained on, as the official code's ``train_test_split``); ``epochs`` shuffled
    passes over the rest in batches of ``batch_size``; Adam at ``lr``; the mean squared error. A
    batch is gathered from the clips' frames when it is used, so memory stays at the frames' size."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    clips = [np.asarray(a, np.float32) for a in arrays]
    clips = [a[np.arange(cfg.frames) % a.shape[0]] if a.shape[0] < cfg.frames else a for a in clips]
    if not clips:
        raise ValueError("no training clips")
    flat = np.ascontiguousarray(np.concatenate(clips))  # (every frame, n_mels)
    first = np.cumsum([0] + [a.shape[0] for a in clips[:-1]])
    starts = np.concatenate([o + np.arange(0, a.shape[0] - cfg.frames + 1, cfg.vector_hop)
                             for o, a in zip(first, clips)])
    order = rng.permutation(len(starts))
    n_val = int(len(starts) * cfg.validation_split)
    val, train = starts[order[:n_val]], starts[order[n_val:]]
    if len(train) < 2:
        raise ValueError(f"{len(train)} training context vector(s): too few to train")
    window = np.arange(cfg.frames)

    def vectors(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(flat[idx[:, None] + window].reshape(len(idx), -1))

    net = AENet(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        perm = train[rng.permutation(len(train))]
        total, seen = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows; the last one or none of the epoch is left out
                continue
            x = vectors(idx)
            loss = F.mse_loss(net(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        history.append({"epoch": epoch, "loss": total / seen, "val_loss": _mean_loss(net, val, vectors, cfg)})
        if epoch == 1 or epoch % 10 == 0 or epoch == cfg.epochs:
            log.info("autoencoder epoch %d/%d: loss %.4g, held-out %s (%.0f s)", epoch, cfg.epochs,
                     history[-1]["loss"], history[-1]["val_loss"], time.perf_counter() - t0)
    net.eval()
    info = {"epochs": cfg.epochs, "train_vectors": int(len(train)), "validation_vectors": int(len(val)),
            "steps": int(cfg.epochs * -(-len(train) // cfg.batch_size)), "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"], "final_val_loss": history[-1]["val_loss"],
            "loss_history": [[h["epoch"], round(h["loss"], 5), h["val_loss"]] for h in history],
            "seconds": round(time.perf_counter() - t0, 1)}
    return net, info


def _mean_loss(net: AENet, idx: np.ndarray, vectors, cfg: AEConfig) -> float | None:
    if len(idx) == 0:
        return None
    net.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(idx), 4096):
            x = vectors(idx[i:i + 4096])
            total += float(F.mse_loss(net(x), x, reduction="sum")) / cfg.input_dim
    return round(total / len(idx), 5)


# ----------------------------------------------------------------------------- a trained type


@dataclass
class TypeModel:
    """One machine type's trained autoencoder with its covariances and thresholds."""

    machine_type: str
    cfg: AEConfig
    net: AENet
    inv_cov_source: np.ndarray | None = None
    inv_cov_target: np.ndarray | None = None
    thresholds: dict = field(default_factory=dict)  # score name -> threshold
    info: dict = field(default_factory=dict)

    def errors(self, fb: np.ndarray) -> np.ndarray:
        """Reconstruction error rows ``(N * frames, n_mels)`` (float64) of one clip's frames (dB)."""
        if fb.shape[1] != self.cfg.n_mels:
            raise ValueError(f"{self.machine_type}: features have {fb.shape[1]} mel bins, model expects "
                             f"{self.cfg.n_mels}")
        v = torch.from_numpy(clip_vectors(np.asarray(fb, np.float32), self.cfg.frames, self.cfg.vector_hop))
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


class Moments:
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


def feature_arrays(table: pa.Table) -> list[np.ndarray]:
    """Each row's ``(T, n_mels)`` front-end frames."""
    return matrix_arrays(table, "fbank")


__all__ = ["AEConfig", "AENet", "Moments", "TypeModel", "clip_vectors", "feature_arrays", "inverse_covariance",
           "mahalanobis_term", "train_type"]
