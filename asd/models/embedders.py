"""Embedders: what :func:`asd.stages.embed.embed` runs over the features, registered by name in
:data:`EMBEDDERS`. An embedder maps lists of feature matrices, one list per name in its
``inputs`` (``fbank``: log-mel ``(frames, bins)``; ``mod``: the modulation spectrum; ``spec``: the
long-term power spectrum), to an ``(n, d)`` float32 array.

``logmel_stats``: per-bin mean and standard deviation over time (the log-mel baseline).

``spectrum``: the long-term log power spectrum itself (training-free, like ``logmel_stats``).

``encoder``: an :class:`~asd.models.encoder.AudioEncoder` checkpoint (ours, e.g.
``<root>/models/pretrain/encoder.pt``, or a BEATs release file) -> pooled patch features of
one block, L2-normalised. The fbank is normalised exactly as in training: the checkpoint's
``meta`` (``norm_mean``/``norm_std``, written by :mod:`asd.stages.pretrain`) or BEATs' constants.
Clips longer than ``max_frames`` are embedded in windows of ``max_frames`` frames (the last
window aligned to the clip's end) and the window embeddings averaged; clips shorter than one
patch are tiled. The checkpoint's architecture names the feature matrix it reads (``inputs``):
log-mel for transformers and :mod:`asd.models.cnn`, the modulation spectrum for
:mod:`asd.models.modnet` (its whole matrix is one window).

``concat``: several embedders side by side, ``members=[{embedder, params, weight}, ...]``:
each member's L2-normalised embedding, concatenated. ``fusion`` says how a kNN uses them:

* ``embedding`` (default): each member scaled by the square root of its weight and the whole
  vector L2-normalised, so the cosine distance is the weighted mean of the members' cosine
  distances and one nearest neighbour is found for all members together;
* ``score``: the members are kept as blocks (recorded with the embeddings,
  :func:`asd.stages.embed.embedder_blocks`) and scoring finds each member's own nearest neighbours
  and sums the weighted distances (:class:`asd.algorithms.knn.FusedBank`) - score-level fusion, as an
  ensemble of detectors.

The served recipe is score-level fusion of log-mel CNNs and modulation CNNs trained
separately (several training seeds each) on the same pseudo labels.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import numpy as np
import torch

from asd.models.encoder import (
    FBANK_MEAN,
    FBANK_STD,
    POOLS,
    AudioEncoder,
    normalize_fbank,
    pooled_dim,
)
from asd.models.registry import load_checkpoint

log = logging.getLogger(__name__)


class Embedder(Protocol):
    name: str
    inputs: tuple[str, ...]  # feature matrices it is called with, in order (asd.stores.features.MATRICES)

    def __call__(self, *features: list[np.ndarray]) -> np.ndarray: ...


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class LogMelStats:
    """Per-bin mean and standard deviation over time (optionally of deltas too), L2-normalised."""

    name = "logmel_stats"
    inputs = ("fbank",)

    def __init__(self, deltas: bool = False):
        self.deltas = deltas

    def __call__(self, features: list[np.ndarray]) -> np.ndarray:
        out = []
        for fb in features:
            parts = [fb.mean(axis=0), fb.std(axis=0)]
            if self.deltas:
                d = np.diff(fb, axis=0) if fb.shape[0] > 1 else np.zeros_like(fb)
                parts += [np.abs(d).mean(axis=0), d.std(axis=0)]
            out.append(np.concatenate(parts))
        return l2n(np.stack(out)) if out else np.zeros((0, 0), np.float32)


class Spectrum:
    """The clip's long-term log power spectrum (the featurize stage's ``spec``), L2-normalised: a
    training-free branch whose cosine kNN compares where a machine's harmonics lie and how strong
    they are, at about 4 Hz a bin."""

    name = "spectrum"
    inputs = ("spec",)

    def __call__(self, features: list[np.ndarray]) -> np.ndarray:
        return l2n(np.stack([f.reshape(-1) for f in features])) if features else np.zeros((0, 0), np.float32)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when this process sees a GPU (embedding actors resolve it first from whether
    Ray gave them one: :func:`asd.stages.embed.actor_device_params`)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def windows(frames: int, size: int) -> list[tuple[int, int]]:
    """[start, end) windows of ``size`` covering ``frames`` (last one aligned to the end)."""
    if frames <= size:
        return [(0, frames)]
    starts = list(range(0, frames - size + 1, size))
    if starts[-1] + size < frames:
        starts.append(frames - size)
    return [(s, s + size) for s in starts]


class EncoderEmbedder:
    """Pooled encoder features of feature matrices: ``(n, d)`` float32, rows L2-normalised."""

    name = "encoder"

    @staticmethod
    def inputs_for(checkpoint: str, **_) -> tuple[str, ...]:
        """The feature matrix the checkpoint's encoder reads (known on the driver, before any actor)."""
        return (getattr(load_checkpoint(checkpoint, map_location="cpu", keep_predictor=False), "input", "fbank"),)

    @staticmethod
    def dim_for(checkpoint: str, pool: str = "mean", **_) -> int:
        """Width of the embedding (loads the checkpoint on the driver)."""
        model = load_checkpoint(checkpoint, map_location="cpu", keep_predictor=False)
        return pooled_dim(model.cfg, pool) if isinstance(model, AudioEncoder) else int(model.cfg.embed_dim)

    def __init__(
        self,
        checkpoint: str,
        layer: int | None = None,
        pool: str = "mean",
        device: str = "auto",
        max_frames: int = 1024,
        batch_size: int = 16,
        bf16: bool = True,
    ):
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.device = resolve_device(device)
        self.model = load_checkpoint(checkpoint, map_location="cpu", keep_predictor=False).to(self.device).eval()
        self.inputs = (getattr(self.model, "input", "fbank"),)
        patch = self.model.min_frames
        if max_frames < patch:
            raise ValueError(f"max_frames must be at least one patch ({patch}), got {max_frames}")
        self.checkpoint = checkpoint
        self.layer = layer
        self.pool = pool
        self.max_frames = max_frames // patch * patch
        self.batch_size = max(1, int(batch_size))
        self.bf16 = bf16 and self.device.type == "cuda"
        meta = self.model.meta or {}
        self.mean = float(meta.get("norm_mean", FBANK_MEAN))
        self.std = float(meta.get("norm_std", FBANK_STD))

    def _segments(self, fb: np.ndarray) -> list[np.ndarray]:
        patch = self.model.min_frames
        if fb.shape[0] < patch:
            reps = -(-patch // max(1, fb.shape[0]))
            fb = np.tile(fb, (reps, 1))[:patch]
        return [fb[s:e] for s, e in windows(fb.shape[0], self.max_frames)]

    @torch.no_grad()
    def _embed_same_length(self, segments: list[np.ndarray]) -> np.ndarray:
        outs = []
        for i in range(0, len(segments), self.batch_size):
            x = torch.from_numpy(np.stack(segments[i : i + self.batch_size]).astype(np.float32))
            x = normalize_fbank(x, self.mean, self.std).to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
                e = self.model.embed(x, layer=self.layer, pool=self.pool)
            outs.append(e.float().cpu().numpy())
        return np.concatenate(outs)

    def __call__(self, features: list[np.ndarray]) -> np.ndarray:
        if not features:
            return np.zeros((0, 0), np.float32)
        segs: list[np.ndarray] = []
        owner: list[int] = []
        for i, fb in enumerate(features):
            for s in self._segments(np.asarray(fb, np.float32)):
                segs.append(s)
                owner.append(i)
        # batch segments of equal length together (no padding masks needed)
        vectors: list[np.ndarray | None] = [None] * len(segs)
        by_len: dict[int, list[int]] = {}
        for j, s in enumerate(segs):
            by_len.setdefault(s.shape[0], []).append(j)
        for idx in by_len.values():
            emb = self._embed_same_length([segs[j] for j in idx])
            for j, e in zip(idx, emb):
                vectors[j] = e
        dim = vectors[0].shape[0]
        out = np.zeros((len(features), dim), np.float64)
        count = np.zeros(len(features))
        for j, i in enumerate(owner):
            out[i] += vectors[j]
            count[i] += 1
        return l2n((out / count[:, None]).astype(np.float32))


FUSIONS = ("embedding", "score")


def _weights(members: list[dict], fusion: str) -> list[float]:
    if not members:
        raise ValueError("concat needs at least one member {embedder, params}")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    weights = [float(m.get("weight", 1.0)) for m in members]
    if not all(np.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"member weights must be positive, got {weights}")
    return weights


class ConcatEmbedder:
    """Members' L2-normalised embeddings side by side: ``(n, sum of dims)`` (see the module
    docstring for ``fusion`` and ``weight``)."""

    name = "concat"

    def __init__(self, members: list[dict], fusion: str = "embedding"):
        self.weights = _weights(members, fusion)
        self.fusion = fusion
        self.members = [make_embedder(m["embedder"], dict(m.get("params") or {})) for m in members]
        self.inputs = tuple(dict.fromkeys(i for m in self.members for i in getattr(m, "inputs", ("fbank",))))

    @staticmethod
    def blocks_for(members: list[dict], fusion: str = "embedding", **_) -> list[dict] | None:
        """Score-level fusion: each member's width and weight, in order; else ``None``."""
        weights = _weights(members, fusion)
        if fusion == "embedding":
            return None
        blocks = []
        for m, w in zip(members, weights):
            factory = EMBEDDERS.get(m["embedder"])
            if factory is None or not hasattr(factory, "dim_for"):
                raise ValueError(f"concat fusion=score: member embedder {m['embedder']!r} cannot state its width")
            blocks.append({"dim": int(factory.dim_for(**dict(m.get("params") or {}))), "weight": w})
        return blocks

    @staticmethod
    def inputs_for(members: list[dict], **_) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for m in members for i in embedder_inputs(m["embedder"], m.get("params"))))

    def __call__(self, *arrays: list[np.ndarray]) -> np.ndarray:
        by_input = dict(zip(self.inputs, arrays))
        parts = [l2n(m(*[by_input[i] for i in getattr(m, "inputs", ("fbank",))])) for m in self.members]
        if not parts[0].size:
            return np.zeros((0, 0), np.float32)
        if self.fusion == "score":  # blocks of unit norm; scoring normalises and searches each on its own
            return np.concatenate(parts, axis=1).astype(np.float32)
        return l2n(np.concatenate([np.sqrt(w) * p for w, p in zip(self.weights, parts)], axis=1))


# embedders that compute from the features alone (no model to load: no GPU, no actor pool sized for one)
FEATURE_EMBEDDERS = ("logmel_stats", "spectrum")

# name -> factory(**params); register() adds one of your own
EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    "logmel_stats": LogMelStats, "spectrum": Spectrum, "encoder": EncoderEmbedder, "concat": ConcatEmbedder}


def register(name: str, factory: Callable[..., Embedder]) -> None:
    EMBEDDERS[name] = factory


def make_embedder(name: str, params: dict[str, Any] | None = None) -> Embedder:
    try:
        factory = EMBEDDERS[name]
    except KeyError:
        raise ValueError(f"unknown embedder {name!r}; known: {sorted(EMBEDDERS)}") from None
    return factory(**(params or {}))


def embedder_inputs(name: str, params: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The feature matrices embedder ``name`` reads with ``params``, without building it (a
    factory's ``inputs_for(**params)``, else its ``inputs``, else log-mel)."""
    factory = EMBEDDERS.get(name)
    if factory is None:
        raise ValueError(f"unknown embedder {name!r}; known: {sorted(EMBEDDERS)}")
    if hasattr(factory, "inputs_for"):
        return tuple(factory.inputs_for(**(params or {})))
    return tuple(getattr(factory, "inputs", ("fbank",)))


def embedder_blocks(name: str, params: dict[str, Any] | None = None) -> list[dict] | None:
    """How scoring splits this embedder's vectors: ``[{"dim", "weight"}, ...]`` for an embedder
    whose members are scored separately and their distances summed (``concat`` with
    ``fusion: score``), else ``None`` (one vector, one kNN). Known on the driver."""
    factory = EMBEDDERS.get(name)
    if factory is None:
        raise ValueError(f"unknown embedder {name!r}; known: {sorted(EMBEDDERS)}")
    return factory.blocks_for(**(params or {})) if hasattr(factory, "blocks_for") else None


__all__ = ["EMBEDDERS", "FEATURE_EMBEDDERS", "ConcatEmbedder", "Embedder", "EncoderEmbedder", "LogMelStats", "Spectrum",
           "embedder_blocks", "embedder_inputs", "l2n", "make_embedder", "register", "resolve_device", "windows"]

