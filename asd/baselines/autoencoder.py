"""The official DCASE 2023-2025 Task 2 autoencoder baseline, trained with Ray Train.

Published description followed here: N. Harada, D. Niizumi, Y. Ohishi, D. Takeuchi and
M. Yasuda, "First-shot anomaly sound detection for machine condition monitoring: a domain
generalization baseline", arXiv:2303.00455 (2023), the baseline of DCASE 2023 Task 2, kept as
the baseline of DCASE 2024 and 2025 Task 2 (T. Nishida et al., "Description and discussion on
DCASE 2024/2025 challenge task 2"); its public code is ``nttcslab/dcase2023_task2_baseline_ae``
(``baseline.yaml``, ``networks/dcase2023t2_ae``, ``networks/criterion/mahala.py``). This file
is our own implementation of that description:

* **Front end**: 16 kHz audio, 1024-point FFT, hop 512, 128 mel bins, power spectrum (power 2),
  ``10 * log10``; a *context vector* is 5 consecutive frames concatenated (640 values, frame
  after frame), taken at every frame (hop 1).
* **Network** (:class:`AENet`): encoder 640-128-128-128-128-8, decoder 8-128-128-128-128-640;
  every Linear except the last is followed by ``BatchNorm1d(momentum=0.01, eps=1e-3)`` and ReLU
  (the 8-unit bottleneck too). Loss: MSE between a context vector and its reconstruction.
  Official training: Adam, learning rate 1e-3, batches of 256 vectors, 100 epochs, one model
  per machine type on that type's normal training clips (source and target domain).
* **AE-MSE score** of a clip: the mean squared reconstruction error over all its context
  vectors.
* **AE-Mahalanobis score** ("selective Mahalanobis"): after training, the reconstruction errors
  of the training clips, cut into 128-value rows (one per frame of each context vector), give one
  covariance matrix for the source-domain and one for the target-domain training clips (the
  source one is used for target when a type has no target training clips, as the official code
  does). A clip's score is the smaller of its source and target Mahalanobis terms. The official
  code evaluates ``mean_ij(d_i^T P d_j)`` over all error rows of a clip, which equals
  ``dbar^T P dbar`` with ``dbar`` the clip's mean error row; that is ``maha_reduction =
  "mean_error"`` (default). ``"mean_distance"`` averages the per-row terms ``d_i^T P d_i``
  instead (the textbook reading), for comparison.
* **Decision threshold**: the 0.9 quantile of a gamma distribution fitted to training scores.

Where this implementation differs, and why:

* **Front end through the featurize stage.** The stored project features are Kaldi fbank at
  25 ms / 10 ms, which cannot give a 1024-point spectrum, so the baseline's own front end is a
  *second feature set*: :func:`featurize_frontend` runs the ordinary featurize stage (Ray Data,
  quarantine, incremental by content hash) with frame length 64 ms (1024 samples, hence a
  1024-point FFT) and shift 32 ms (512 samples) into ``<root>/baselines/ae/``. That is Kaldi's
  filterbank, not librosa's: HTK mel spacing from 20 Hz with unit-peak triangles (librosa: Slaney
  spacing, area-normalised, from 0 Hz), pre-emphasis 0.97, per-frame DC removal, a symmetric Hann
  window, no centre padding (two frames fewer per clip), and the natural log of the power of the
  int16-scaled waveform, which we turn into decibels (``x * 10 / ln 10``). Per-bin gains and
  constant offsets (filter normalisation, the 2**15 scale and, approximately, pre-emphasis, whose
  gain varies inside a band) only shift each input bin by a constant, which the first BatchNorm
  removes after the first Linear and the last bias learns at the output; the mel spacing and the
  window are the real differences.
* **One scalar subtracted.** The decibel values have the type's training mean (one number over
  all bins and frames of its training clips) subtracted, so a short training does not spend its
  steps moving the output bias by tens of dB. A constant offset is absorbed by the first
  BatchNorm and the output bias, so the model class is unchanged.
* **One Ray Train run for all types.** The official recipe runs one training per machine type.
  Here every type's autoencoder is trained side by side in one :func:`asd.train.fit` run
  (:class:`AEBank`: independent networks; a clip goes only through its own type's network and the
  loss is the sum of the per-type mean errors, so each network gets exactly the gradient it would
  get alone, and Adam's state is per parameter). The models are still one per type; the reason is
  cost: each Ray Train run pays a start-up of 30-50 s on a small machine, once per run instead of
  once per type.
* **Training budget and batches.** :func:`asd.train.fit` feeds random crops of clips
  (:class:`asd.batches.FeatureBatches`): per type, a batch holds about 22 clips x 16 frames = 22 x 12
  context vectors (264, close to the official 256); the default is 1000 steps, far fewer than 100
  epochs over every vector of a full DCASE type. Adam's settings are kept (lr 1e-3, no weight
  decay, no warm-up, constant rate, no clipping). The official 10 % validation hold-out only
  monitors the loss; it is not kept.
* **BatchNorm statistics recomputed before export.** With momentum 0.01 the running statistics
  need thousands of steps to reach the training-set statistics that 100 epochs end at; a short
  run would score with half-initial statistics. After training they are recomputed as plain
  averages over random batches of training vectors (standard BN recalibration,
  ``recalibrate_bn``).
* **Covariance.** A centred sample covariance over all error rows of a domain, plus a ridge of
  ``maha_ridge`` x the mean variance on the diagonal so that a small domain stays invertible
  (the official code centres per batch, divides by the number of vectors rather than rows, and
  inverts without a ridge: the same matrix up to a scale and the batch centring).
* **Thresholds** are fitted on per-clip training scores (the official fit uses per-batch losses).

Outputs: ``<root>/baselines/ae/features`` (the front end), ``<root>/baselines/ae/train_view``
(the training clips' rows as a feature view, what Ray Train reads; see
:func:`asd.features.write_feature_view`), ``<root>/checkpoints/<tag>`` (Ray Train checkpoints)
and, published atomically (staging folder, then ``_SUCCESS``), ``<root>/models/<tag>/``:
``config.json`` (front end, architecture, per-type offset, thresholds, training summary),
``<type>/autoencoder.pt`` (weights) and ``<type>/mahalanobis.npz`` (source and target
covariances and their inverses).
:func:`score_autoencoders` scores clips with a Ray Data actor pool and returns the score table of
:mod:`asd.score` (``SCORE_SCHEMA``) for each score, so :func:`asd.score.write_results` writes the
same DCASE CSVs, metrics and report as the kNN scoring.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn as nn

from asd import commitlog, layout, storage
from asd.checkpoints import load_training_state
from asd.features import (
    KEY_COLUMNS,
    load_stats,
    matrix_arrays,
    matrix_columns,
    read_commits,
    read_features_ray,
    read_features_table,
    write_feature_view,
)
from asd.featurize import (
    FeaturizeConfig,
    FeaturizeResult,
    featurize,
)
from asd.frontend import FbankConfig
from asd.knn import fit_threshold
from asd.loop import ObjectiveBase, TrainConfig
from asd.score import SCORE_SCHEMA
from asd.train import TrainResult, fit, stage_train_config

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




def frontend_config(cfg: AEConfig, base: FeaturizeConfig | None = None) -> FeaturizeConfig:
    """The featurize stage's config for the baseline front end (batching etc. from ``base``)."""
    base = base or FeaturizeConfig()
    return replace(base, fbank=cfg.fbank(), modulation=replace(base.modulation, enabled=False))


def featurize_frontend(input_uri: str, root: str, cfg: AEConfig | None = None,
                       base: FeaturizeConfig | None = None) -> FeaturizeResult:
    """Featurize ``input_uri`` with the baseline's front end into ``<root>/baselines/ae``.

    Incremental like every featurize run; refuses a root whose features were made with other
    filterbank settings (mixing frame settings would silently corrupt the baseline).
    """
    cfg = cfg or AEConfig()
    fcfg = frontend_config(cfg, base)
    out = layout.ae_root(root)
    hashes = {c.get("config_hash") for c in read_commits(layout.features_dir(out))} - {None}
    if hashes - {fcfg.config_hash()}:
        raise ValueError(f"{layout.features_dir(out)!r} holds features of other filterbank settings "
                         f"(config hash {sorted(hashes)} != {fcfg.config_hash()}); use a fresh root")
    return featurize(input_uri, out, fcfg)


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
    """The baseline's training objective for :func:`asd.train.fit`: every type's autoencoder on the
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


# ----------------------------------------------------------------------------- training


@dataclass
class AETrainResult:
    models: str  # <root>/models/<tag> (published)
    per_type: dict  # machine type -> clips, covariances, thresholds, ...
    training: dict  # the Ray Train run: steps, loss history, checkpoint, seconds
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def default_training_clips(table: pa.Table) -> list[str]:
    """The scoring stage's rule: clips of the train split that are not labelled anomalous."""
    is_train = pc.equal(table.column("split"), "train")
    anomalous = pc.fill_null(pc.equal(table.column("label"), "anomaly"), False)
    return table.filter(pc.and_(is_train, pc.invert(anomalous))).column("clip_id").to_pylist()


def train_autoencoders(
    features_root: str,
    out_root: str,
    cfg: AEConfig | None = None,
    tcfg: TrainConfig | None = None,
    train_clips: Iterable[str] | None = None,
) -> AETrainResult:
    """Train one autoencoder per machine type on ``features_root`` (the baseline's front end, e.g.
    ``<root>/baselines/ae``) with :func:`asd.train.fit`, compute each type's covariances and
    thresholds and publish everything under ``<out_root>/models/<cfg.tag>/``.

    ``train_clips``: the clip ids to train on (default: the train split's clips not labelled
    anomalous). They become a feature view ``<features_root>/train_view`` (what Ray Train reads).
    All types train in one Ray Train run (:class:`AEBank`: independent networks, each fed only its
    own type's clips), so Ray Train's start-up is paid once; ``tcfg.batch_size`` counts clips per
    type when ``cfg.batch_per_type``. Checkpoints: ``tcfg.storage_path`` (default
    ``<out_root>/checkpoints``), run ``tcfg.name`` (default: the tag).
    """
    cfg = cfg or AEConfig()
    tcfg = tcfg or default_train_config()
    if tcfg.crop_frames < cfg.frames:
        raise ValueError(f"crop_frames {tcfg.crop_frames} is shorter than one {cfg.frames}-frame context vector")
    t0 = time.perf_counter()
    keys = read_features_table(features_root, columns=KEY_COLUMNS + ["num_mel_bins"])
    if keys.num_rows == 0:
        raise FileNotFoundError(f"no committed features under {layout.features_dir(features_root)!r}; "
                                "run featurize_frontend first")
    bins = set(keys.column("num_mel_bins").to_pylist())
    if bins != {cfg.n_mels}:
        raise ValueError(f"{layout.features_dir(features_root)!r} has {sorted(bins)} mel bins; the autoencoder expects "
                         f"{cfg.n_mels} (featurize with featurize_frontend)")
    ids = set(default_training_clips(keys) if train_clips is None else (str(c) for c in train_clips))
    known = set(keys.column("clip_id").to_pylist())
    if ids - known:
        raise ValueError(f"{len(ids - known)} training clip(s) have no features under {features_root!r}, "
                         f"e.g. {sorted(ids - known)[:3]}")
    if not ids:
        raise ValueError(f"no training clips under {features_root!r}: nothing to train the autoencoder on")
    view = storage.join(features_root, "train_view")
    write_feature_view(features_root, view, sorted(ids), split="train", note="autoencoder training clips")
    stats = load_stats(view)["per_type"]
    types = sorted(stats)
    # (fbank - mean) / (2 * std) with std = 1 / (2 * dB per neper): crops arrive in dB
    offsets = {t: (float(np.mean(stats[t]["mean"])) * DB_PER_NEPER if cfg.center else 0.0) for t in types}
    scale = 1.0 / (2.0 * DB_PER_NEPER)
    tcfg = stage_train_config(tcfg, cfg.tag, out_root)
    if cfg.batch_per_type:
        tcfg = replace(tcfg, batch_size=tcfg.batch_size * len(types))
    objective = AutoencoderObjective(cfg, types, offsets)
    res: TrainResult = fit(objective, view, tcfg, norm=(0.0, scale))
    if res.checkpoint is None:
        raise RuntimeError(f"training run {res.run} produced no checkpoint")
    bank = AEBank(cfg, types)
    bank.load_state_dict(load_training_state(res.checkpoint)["module"])
    losses = [h["loss"] for h in res.history if "loss" in h]
    summary = {"steps": res.step, "batch_clips": tcfg.batch_size, "first_loss": losses[0] if losses else None,
               "final_loss": res.final_loss, "loss_history": [[h["step"], h["loss"]] for h in res.history if "loss" in h],
               "checkpoint": res.checkpoint, "run": res.run, "view": view, "train_seconds": res.seconds,
               "workers": res.num_workers}
    out_uri = layout.models_dir(out_root, cfg.tag)
    staging = storage.staging_dir(out_uri)
    per_type: dict = {}
    try:
        table = read_features_table(view, columns=KEY_COLUMNS + FEATURE_COLUMNS)
        for i, mt in enumerate(types):
            rows = table.filter(pc.equal(table.column("machine_type"), mt))
            net = bank.nets[str(i)]
            net.eval()
            model = TypeModel(mt, cfg, net, (offsets[mt] / DB_PER_NEPER, scale))
            per_type[mt] = _finish_type(model, rows, staging, seed=tcfg.seed)
        config = {
            "method": "DCASE 2023-2025 Task 2 autoencoder baseline (arXiv:2303.00455)",
            "ae": asdict(cfg),
            "frontend": asdict(cfg.fbank()),
            "train": json.loads(json.dumps(asdict(tcfg), default=list)),
            "training": summary,
            "features_root": features_root,
            "machine_types": per_type,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.atomic_write_json(storage.join(staging, "config.json"), config)
        commitlog.publish_dir(staging, out_uri, {"machine_types": types})
    except BaseException:
        storage.remove(staging)  # nothing half-written is left beside the published models
        raise
    log.info("trained %d autoencoder(s) for %d steps (loss %s -> %s) into %s", len(types), res.step,
             summary["first_loss"], res.final_loss, out_uri)
    return AETrainResult(models=out_uri, per_type=per_type, training=summary, seconds=time.perf_counter() - t0)


def _finish_type(model: TypeModel, rows: pa.Table, staging: str, seed: int = 0) -> dict:
    """BN recalibration, source/target covariances, training scores and thresholds of one type;
    writes its weights and covariances into ``staging``."""
    cfg, mt = model.cfg, model.machine_type
    arrays = _arrays(rows)
    n_recal = recalibrate_batchnorm(model, arrays, seed=seed) if cfg.recalibrate_bn else 0
    domains = ["target" if d == "target" else "source" for d in rows.column("domain").to_pylist()]
    moments = {"source": _Moments(cfg.n_mels), "target": _Moments(cfg.n_mels)}
    errors = []
    for a, d in zip(arrays, domains):
        e = model.errors(a)
        moments[d].add(e)
        errors.append(e)
    cov = {d: moments[d].covariance() for d in moments if moments[d].n >= 2}
    if "source" not in cov:  # every training clip of the type is a target clip: use them for both
        cov["source"] = cov["target"]
    target_fallback = "target" not in cov
    if target_fallback:  # the official rule: no target training clips -> the source covariance
        cov["target"] = cov["source"]
    model.inv_cov_source = inverse_covariance(cov["source"], cfg.maha_ridge)
    model.inv_cov_target = inverse_covariance(cov["target"], cfg.maha_ridge)
    mse = np.array([float(np.mean(e**2)) for e in errors])
    maha = np.array([min(mahalanobis_term(e, model.inv_cov_source, cfg.maha_reduction),
                         mahalanobis_term(e, model.inv_cov_target, cfg.maha_reduction)) for e in errors])
    model.thresholds = {"ae_mse": float(fit_threshold(mse, "gamma", cfg.threshold_q)),
                        "ae_mahalanobis": float(fit_threshold(maha, "gamma", cfg.threshold_q))}
    info = {
        "weights": f"{mt}/autoencoder.pt",
        "mahalanobis": f"{mt}/mahalanobis.npz",
        "norm": list(model.norm),
        "offset_db": model.norm[0] * DB_PER_NEPER,
        "thresholds": model.thresholds,
        "train_clips": len(arrays),
        "train_clips_source": domains.count("source"),
        "train_clips_target": domains.count("target"),
        "error_rows_source": moments["source"].n,
        "error_rows_target": moments["target"].n,
        "target_covariance": "source (no target training clips)" if target_fallback else "target",
        "bn_recalibration_vectors": n_recal,
        "train_mse_mean": float(mse.mean()),
        "train_mahalanobis_mean": float(maha.mean()),
    }
    buf = io.BytesIO()
    torch.save({"state_dict": model.net.state_dict(), "ae": asdict(cfg), "norm": list(model.norm),
                "machine_type": mt}, buf)
    storage.atomic_write_bytes(storage.join(staging, mt, "autoencoder.pt"), buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, cov_source=cov["source"], cov_target=cov["target"], inv_cov_source=model.inv_cov_source,
             inv_cov_target=model.inv_cov_target)
    storage.atomic_write_bytes(storage.join(staging, mt, "mahalanobis.npz"), buf.getvalue())
    log.info("autoencoder %s: %d training clips (%d source, %d target), target covariance from %s", mt,
             len(arrays), info["train_clips_source"], info["train_clips_target"], info["target_covariance"])
    return info


def load_autoencoders(models_uri: str) -> dict[str, TypeModel]:
    """The published per-type models of ``<root>/models/<tag>`` (weights in eval mode)."""
    storage.require_published(models_uri)
    config = storage.read_json(storage.join(models_uri, "config.json"))
    cfg = AEConfig(**config["ae"])
    out = {}
    for mt, info in config["machine_types"].items():
        state = torch.load(io.BytesIO(storage.read_bytes(storage.join(models_uri, info["weights"]))),
                           map_location="cpu", weights_only=True)
        net = AENet(cfg)
        net.load_state_dict(state["state_dict"])
        net.eval()
        maha = np.load(io.BytesIO(storage.read_bytes(storage.join(models_uri, info["mahalanobis"]))))
        out[mt] = TypeModel(mt, cfg, net, tuple(info["norm"]), maha["inv_cov_source"], maha["inv_cov_target"],
                            dict(info["thresholds"]), info)
    return out


# ----------------------------------------------------------------------------- scoring


_RAW_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("machine_type", pa.string()), ("section", pa.string()), ("domain", pa.string()),
    ("label", pa.string()), ("mse", pa.float64()), ("maha", pa.float64()), ("maha_source", pa.float64()),
    ("maha_target", pa.float64()),
])


def score_rows(models: dict[str, TypeModel], batch: pa.Table) -> pa.Table:
    """Both scores of every feature row of ``batch`` (the work of one scoring batch)."""
    keys = batch.select(["clip_id", "machine_type", "section", "domain", "label"]).to_pylist()
    cols: dict[str, list] = {k: [] for k in _RAW_SCHEMA.names}
    for row, fb in zip(keys, _arrays(batch)):
        mt = row["machine_type"]
        if mt not in models:
            raise KeyError(f"no trained autoencoder for machine type {mt!r} (clip {row['clip_id']}): "
                           f"trained types are {sorted(models)}")
        s = models[mt].scores(fb)
        for k in ("clip_id", "machine_type", "section", "domain", "label"):
            cols[k].append(row[k])
        for k in ("mse", "maha", "maha_source", "maha_target"):
            cols[k].append(s.get(k))
    return pa.table(cols, schema=_RAW_SCHEMA)


class _AEScorer:
    """Ray Data callable class: loads the published models once per actor."""

    def __init__(self, models_uri: str):
        torch.set_num_threads(1)
        self.models = load_autoencoders(models_uri)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_rows(self.models, batch)


def score_tables(raw: pa.Table, models: dict[str, TypeModel]) -> dict[str, tuple[pa.Table, dict]]:
    """Per score (``ae_mse``, ``ae_mahalanobis``): a :data:`asd.score.SCORE_SCHEMA` table sorted by
    clip id and its thresholds per (machine type, section)."""
    raw = raw.sort_by("clip_id")
    rows = raw.to_pylist()
    out = {}
    for name, col, src, tgt in (("ae_mse", "mse", None, None), ("ae_mahalanobis", "maha", "maha_source", "maha_target")):
        thr = np.array([models[r["machine_type"]].thresholds[name] for r in rows], np.float32)
        score = np.array([r[col] for r in rows], np.float32)
        table = pa.table({
            "clip_id": raw.column("clip_id"), "machine_type": raw.column("machine_type"),
            "section": raw.column("section"), "domain": raw.column("domain"), "label": raw.column("label"),
            "score": pa.array(score, pa.float32()),
            "score_source": raw.column(src).cast(pa.float32()) if src else pa.nulls(len(rows), pa.float32()),
            "score_target": raw.column(tgt).cast(pa.float32()) if tgt else pa.nulls(len(rows), pa.float32()),
            "threshold": pa.array(thr, pa.float32()),
            "decision": pa.array((score > thr).astype(np.int8), pa.int8()),
        }, schema=SCORE_SCHEMA)
        thresholds = {(r["machine_type"], r["section"]): float(models[r["machine_type"]].thresholds[name])
                      for r in rows}
        out[name] = (table, thresholds)
    return out


def score_autoencoders(
    features_root: str,
    models_uri: str,
    clip_ids: Iterable[str] | None = None,
    cfg: AEConfig | None = None,
) -> dict[str, tuple[pa.Table, dict]]:
    """Score clips of ``features_root`` (the baseline's front end) with the models of ``models_uri``
    on a Ray Data actor pool: the clips of ``clip_ids``, else the test split. Returns
    ``{"ae_mse": (scores, thresholds), "ae_mahalanobis": (scores, thresholds)}``, ready for
    :func:`asd.score.write_results`."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col

    cfg = cfg or AEConfig()
    models = load_autoencoders(models_uri)
    if not ray.is_initialized():
        ray.init()
    ds = read_features_ray(features_root, columns=KEY_COLUMNS + FEATURE_COLUMNS)
    if clip_ids is not None:
        wanted = sorted({str(c) for c in clip_ids})
        if not wanted:
            raise ValueError("no clips to score")
        ds = ds.filter(expr=col("clip_id").is_in(wanted))
    else:
        wanted = None
        ds = ds.filter(expr=col("split") == "test")
    ds = ds.map_batches(_AEScorer, fn_constructor_kwargs={"models_uri": models_uri}, batch_size=cfg.score_batch_size,
                        batch_format="pyarrow", compute=ActorPoolStrategy(size=max(1, cfg.num_actors)),
                        num_cpus=cfg.num_cpus)
    raw = storage.collect_tables(ds, _RAW_SCHEMA)
    if wanted is not None:
        missing = set(wanted) - set(raw.column("clip_id").to_pylist())
        if missing:
            raise ValueError(f"{len(missing)} clip(s) to score have no features under {features_root!r}, "
                             f"e.g. {sorted(missing)[:3]}")
    return score_tables(raw, models)


# ----------------------------------------------------------------------------- the whole baseline


@dataclass
class BaselineResult:
    frontend: dict
    train: dict
    scores: dict  # score name -> asd.score.ScoreResult as a dict

    def to_dict(self) -> dict:
        return asdict(self)


def run_baseline(
    input_uri: str,
    root: str,
    cfg: AEConfig | None = None,
    tcfg: TrainConfig | None = None,
    fcfg: FeaturizeConfig | None = None,
    plots: bool = True,
) -> BaselineResult:
    """The baseline end to end on a DCASE-layout corpus: front end, per-type training on the train
    split, both scores of the test split written like the kNN scoring to
    ``<root>/scores/ae_mse`` and ``<root>/scores/ae_mahalanobis``."""
    from asd.score import ScoreConfig, write_results

    cfg = cfg or AEConfig()
    feat = featurize_frontend(input_uri, root, cfg, fcfg)
    trained = train_autoencoders(layout.ae_root(root), root, cfg, tcfg)
    scored = score_autoencoders(layout.ae_root(root), trained.models, cfg=cfg)
    results = {}
    for name, (table, thresholds) in scored.items():
        res = write_results(table, thresholds, layout.scores_dir(root, name), ScoreConfig(plots=plots),
                            title=f"DCASE autoencoder baseline, {name}")
        results[name] = res.to_dict()
    return BaselineResult(frontend=feat.to_dict(), train=trained.to_dict(), scores=results)


__all__ = [
    "AEBank",
    "AEConfig",
    "AENet",
    "AETrainResult",
    "AutoencoderObjective",
    "BaselineResult",
    "TypeModel",
    "clip_vectors",
    "context_vectors",
    "default_train_config",
    "default_training_clips",
    "featurize_frontend",
    "frontend_config",
    "inverse_covariance",
    "load_autoencoders",
    "mahalanobis_term",
    "recalibrate_batchnorm",
    "run_baseline",
    "score_autoencoders",
    "score_rows",
    "score_tables",
    "train_autoencoders",
]
