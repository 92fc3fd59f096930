"""Cosine kNN anomaly scoring with separate source/target memory banks.

DCASE 2023–2025 Task 2 style scoring: every clip is represented by an embedding, and
the anomaly score of a test clip is its cosine k-nearest-neighbour distance to the
embeddings of *normal* training clips of the same machine type and section.

Because the target domain has very few training clips (about 10 per machine type
against about 990 source clips), source and target clips are kept in two separate
memory banks and the score is the **minimum** of the two kNN distances; a shared bank
would let the many source clips drown the few target ones when ``k > 1`` and would
make condensation discard them. The source bank may optionally be condensed to ``K``
k-means centroids to cut memory and compute.

Decision thresholds are fitted on leave-one-out training scores
(:meth:`MemoryBank.train_scores`) by :mod:`asd.algorithms.thresholds`.

Everything here is plain numpy/torch (no Ray); :class:`MemoryBank` is a small picklable
dataclass (scoring puts the banks in Ray's object store once per run).

Conventions
-----------
* Embeddings are ``(n, d)`` arrays; they are L2-normalised internally, so callers may
  pass raw embeddings. All-zero rows stay zero (cosine similarity 0 to everything,
  i.e. distance 1).
* Cosine distance is ``1 - cos`` clipped to ``[0, 2]``; scores are ``float32``.
* An empty bank scores every query ``+inf`` (neutral for the min over banks).
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asd.data.dcase import DOMAINS, SOURCE, TARGET, normalize_domain

logger = logging.getLogger(__name__)


__all__ = [
    "DOMAINS",
    "FusedBank",
    "MemoryBank",
    "SOURCE",
    "TARGET",
    "knn_distance",
    "l2_normalize",
]


# --------------------------------------------------------------------------- helpers
def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as a C-contiguous 2-D float32 array, checking shape and finiteness."""
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {arr.shape}")
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """L2-normalise the rows of ``x`` and return them as a new float32 array.

    Rows whose norm is below ``eps`` (e.g. all-zero rows) are divided by ``eps``
    instead, so they stay (near) zero rather than becoming NaN. A 1-D input is
    treated as a single vector and normalised as such.
    """
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        return l2_normalize(arr[None, :], eps)[0]
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    return np.ascontiguousarray(arr / np.maximum(norms, np.float32(eps)), dtype=np.float32)


def _domain_mask(domains: Sequence[str | None], n: int) -> np.ndarray:
    """Boolean mask of target rows for ``n`` embeddings with the given domain labels."""
    labels = [normalize_domain(d) for d in domains]
    if len(labels) != n:
        raise ValueError(f"got {n} embeddings but {len(labels)} domain labels")
    return np.array([lab == TARGET for lab in labels], dtype=bool)


# ---------------------------------------------------------------------- kNN search
def knn_distance(
    queries: np.ndarray,
    bank: np.ndarray,
    k: int = 1,
    chunk_size: int = 4096,
    exclude_self: bool = False,
    device: str = "cpu",
    bank_normalized: bool = False,
    nearest: np.ndarray | None = None,
) -> np.ndarray:
    """Mean cosine distance from each query to its ``k`` nearest bank rows.

    Exact search: queries and bank are L2-normalised, then processed in chunks of
    ``chunk_size`` queries with one ``(chunk, m)`` similarity matrix product each
    (memory ``O(chunk_size * m)``): numpy/BLAS on CPU, torch on an accelerator.

    Args:
        queries: ``(n, d)`` embeddings (need not be normalised).
        bank: ``(m, d)`` embeddings of normal training clips (need not be normalised).
        k: number of neighbours averaged. If more than the available bank rows, all
            available rows are used and a :class:`UserWarning` is issued.
        chunk_size: queries per matrix product.
        exclude_self: leave-one-out mode for training scores: ``queries`` are the
            bank rows in the same order and query ``i`` never matches bank row ``i``
            (identical duplicates at other indices still count).
        device: torch device for the products, e.g. ``"cpu"`` or ``"cuda"``.
        bank_normalized: the bank is already a finite, L2-normalised float32 array
            (a :class:`MemoryBank`'s): skip re-checking and re-normalising it, which
            for a large bank costs more than the search of a small batch.
        nearest: an ``(n,)`` integer array to fill with the row of each query's nearest bank
            row (the closest of its ``k``), found in the same pass; ``-1`` where no bank row
            is available.

    Returns:
        ``(n,)`` float32 distances in ``[0, 2]``; ``+inf`` where no bank row is
        available (empty bank, or a one-row bank with ``exclude_self``).
    """
    q = _as_matrix(queries, "queries")
    b = np.ascontiguousarray(bank, dtype=np.float32) if bank_normalized else _as_matrix(bank, "bank")
    if b.ndim != 2:
        raise ValueError(f"bank must be a 2-D (n, d) array, got shape {b.shape}")
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but the bank has {b.shape[1]}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if exclude_self and q.shape[0] != b.shape[0]:
        raise ValueError(
            "exclude_self=True needs the queries to be the bank rows in the same order, "
            f"got {q.shape[0]} queries and {b.shape[0]} bank rows"
        )
    k, chunk_size = int(k), int(chunk_size)
    n, m = q.shape[0], b.shape[0]
    available = m - 1 if exclude_self else m
    if nearest is not None:
        nearest[:] = -1
    if n == 0:
        return np.empty(0, dtype=np.float32)
    if available <= 0:
        return np.full(n, np.inf, dtype=np.float32)
    if k > available:
        warnings.warn(
            f"k={k} exceeds the {available} available bank rows; using k={available}",
            UserWarning,
            stacklevel=2,
        )
        k = available

    if str(device) == "cpu":
        return _knn_numpy(l2_normalize(q), b if bank_normalized else l2_normalize(b), k, chunk_size, exclude_self,
                          nearest)
    import torch  # accelerators only: CPU scoring needs no torch import (actor start-up)

    dev = torch.device(device)
    out = np.empty(n, dtype=np.float32)
    with torch.inference_mode():
        bank_t = device_copy(b, dev) if bank_normalized else torch.from_numpy(l2_normalize(b)).to(dev)
        q_norm = l2_normalize(q)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            sim = torch.from_numpy(q_norm[start:stop]).to(dev) @ bank_t.T  # (c, m)
            if exclude_self:
                rows = torch.arange(stop - start, device=dev)
                sim[rows, rows + start] = -math.inf
            top = torch.topk(sim, k, dim=1, largest=True, sorted=False).values
            dist = (1.0 - top).clamp_(0.0, 2.0).mean(dim=1)
            out[start:stop] = dist.cpu().numpy()
            if nearest is not None:
                nearest[start:stop] = sim.argmax(dim=1).cpu().numpy()
    return out


# A bank array's copy on an accelerator, kept while the array lives: a scoring worker scores
# many batches against the same banks (asd.stages.score keeps them per worker), so each bank crosses to
# the device once per run instead of once per batch.
_DEVICE_COPIES: dict[tuple[int, str], tuple[weakref.ref, Any]] = {}


def device_copy(bank: np.ndarray, dev) -> Any:
    """``bank`` (a finite, normalised float32 array that is not modified afterwards, as a
    :class:`MemoryBank`'s) as a torch tensor on ``dev``, made once per array and device."""
    import torch

    key = (id(bank), str(dev))
    hit = _DEVICE_COPIES.get(key)
    if hit is not None and hit[0]() is bank:
        return hit[1]
    for k in [k for k, (ref, _) in _DEVICE_COPIES.items() if ref() is None]:  # banks of runs gone
        del _DEVICE_COPIES[k]
    t = torch.from_numpy(bank).to(dev)
    _DEVICE_COPIES[key] = (weakref.ref(bank), t)
    return t


def _knn_numpy(q: np.ndarray, b: np.ndarray, k: int, chunk_size: int, exclude_self: bool = False,
               nearest: np.ndarray | None = None) -> np.ndarray:
    """CPU path of :func:`knn_distance` (normalised inputs): BLAS products, max or partition."""
    out = np.empty(q.shape[0], dtype=np.float32)
    for start in range(0, q.shape[0], chunk_size):
        sim = q[start : start + chunk_size] @ b.T
        if exclude_self:
            rows = np.arange(sim.shape[0])
            sim[rows, rows + start] = -np.inf
        if nearest is not None:
            nearest[start : start + chunk_size] = sim.argmax(axis=1)
        if k == 1:
            top = sim.max(axis=1, keepdims=True)
        else:
            top = np.partition(sim, sim.shape[1] - k, axis=1)[:, -k:]
        out[start : start + chunk_size] = np.clip(1.0 - top, 0.0, 2.0).mean(axis=1)
    return out


# --------------------------------------------------------------------- memory bank
@dataclass(eq=False)
class MemoryBank:
    """Separate source and target memory banks of one group (machine type, section).

    Attributes:
        source: ``(m_s, d)`` float32 L2-normalised source embeddings, or ``K`` k-means
            centroids when condensed.
        target: ``(m_t, d)`` float32 L2-normalised target embeddings; may be ``(0, d)``.
        n_source_clips: number of source training clips the bank was built from
            (equals ``len(source)`` unless condensed). ``None`` means ``len(source)``.
        source_scale, target_scale: each bank's distances are divided by its scale before
            the minimum is taken (1.0: raw distances). ``build(normalize="loo_mean")`` sets
            them to the mean leave-one-out kNN distance of the bank's own clips, so that a
            dense source bank of hundreds of clips and a sparse target bank of ten meet on
            one scale: a test clip is judged by how far it lies from a bank relative to how
            far that bank's normal clips lie from one another.
        source_ids, target_ids: what names each bank row (``build``'s ``ids``: the clip ids of
            the training clips, else their positions), so :meth:`score_nearest` can say which
            training clip a score came from; ``source_ids`` is ``None`` for a condensed source
            bank, whose rows are centroids and no clip.

    Build with :meth:`build`; the instance is picklable (Ray object store).
    """

    source: np.ndarray
    target: np.ndarray
    n_source_clips: int | None = None
    source_scale: float = 1.0
    target_scale: float = 1.0
    source_ids: list | None = None
    target_ids: list | None = None

    def __post_init__(self) -> None:
        self.source = _as_matrix(self.source, "source bank")
        self.target = _as_matrix(self.target, "target bank")
        if self.source.shape[1] != self.target.shape[1]:
            raise ValueError(
                f"source bank dimension {self.source.shape[1]} != "
                f"target bank dimension {self.target.shape[1]}"
            )
        if self.n_source_clips is None:
            self.n_source_clips = int(self.source.shape[0])
        self.n_source_clips = int(self.n_source_clips)
        for name in ("source_scale", "target_scale"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number, got {value}")
            setattr(self, name, value)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        domains: Sequence[str | None],
        condense_source: int | None = None,
        seed: int = 0,
        normalize: str | None = None,
        k: int = 1,
        ids: Sequence | None = None,
    ) -> MemoryBank:
        """Build the banks from normal training embeddings and their domain labels.

        Args:
            embeddings: ``(n, d)`` training embeddings (normalised here).
            domains: ``n`` labels, ``"source"`` / ``"target"`` (case-insensitive);
                ``None`` counts as source.
            condense_source: if given, replace the source bank by this many k-means
                centroids (computed on the normalised embeddings, then re-normalised).
                Skipped when the source bank has at most that many rows. The target
                bank is never condensed.
            seed: k-means random state.
            normalize: ``None`` (raw distances) or ``"loo_mean"``: each bank's scale is the
                mean leave-one-out ``k``-NN distance among its own clips (computed before
                condensation). A bank of fewer than two clips has no such distance and
                takes the other bank's scale (1.0 if neither has one).
            k: neighbours of the leave-one-out distances (the scoring ``k``).
            ids: ``n`` names of the rows (clip ids), kept per bank row (default: row positions).
        """
        emb = l2_normalize(_as_matrix(embeddings, "embeddings"))
        is_target = _domain_mask(domains, emb.shape[0])
        source, target = emb[~is_target], emb[is_target]
        n_source = int(source.shape[0])
        names = list(range(emb.shape[0])) if ids is None else list(ids)
        if len(names) != emb.shape[0]:
            raise ValueError(f"got {emb.shape[0]} embeddings but {len(names)} ids")
        source_ids = [n for n, t in zip(names, is_target) if not t]
        target_ids = [n for n, t in zip(names, is_target) if t]
        scales = bank_scales(source, target, normalize, k)
        if condense_source is not None:
            n_clusters = int(condense_source)
            if n_clusters < 1:
                raise ValueError(f"condense_source must be >= 1, got {condense_source}")
            if n_source > n_clusters:
                source = _kmeans_centroids(source, n_clusters, seed)
                source_ids = None  # centroids: no clip
        return cls(
            source=np.ascontiguousarray(source),
            target=np.ascontiguousarray(target),
            n_source_clips=n_source,
            source_scale=scales[SOURCE],
            target_scale=scales[TARGET],
            source_ids=source_ids,
            target_ids=target_ids,
        )

    # ----------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.source.shape[1])

    @property
    def condensed(self) -> bool:
        """Whether the source bank holds k-means centroids instead of the clips."""
        return self.n_source_clips != self.source.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the two bank arrays."""
        return int(self.source.nbytes + self.target.nbytes)

    # ------------------------------------------------------------------- scoring
    def score_by_bank(
        self,
        queries: np.ndarray,
        k: int = 1,
        chunk_size: int = 4096,
        device: str = "cpu",
    ) -> dict[str, np.ndarray]:
        """kNN distance of each query to each bank: ``{"source": ..., "target": ...}``.

        Each bank's distances are divided by its scale (1.0 unless built with ``normalize``).
        An empty bank gives ``+inf`` for every query.
        """
        return {
            name: knn_distance(queries, bank, k=k, chunk_size=chunk_size, device=device, bank_normalized=True) / scale
            for name, bank, scale in ((SOURCE, self.source, self.source_scale),
                                      (TARGET, self.target, self.target_scale))
        }

    def score_parts(self, queries: np.ndarray, k: int = 1, chunk_size: int = 4096,
                    device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(score, source distance, target distance)`` of each query (score: their minimum)."""
        by_bank = self.score_by_bank(queries, k=k, chunk_size=chunk_size, device=device)
        return np.minimum(by_bank[SOURCE], by_bank[TARGET]), by_bank[SOURCE], by_bank[TARGET]

    def score_nearest(self, queries: np.ndarray, k: int = 1, chunk_size: int = 4096, device: str = "cpu"
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """:meth:`score_parts` and, per query, the id of the training clip the score came from: the
        nearest row of the bank that gave the minimum (the closest of its ``k``); ``None`` where
        that bank is a condensed source bank (a centroid, no clip) or empty."""
        dist, near = {}, {}
        for name, bank, scale in ((SOURCE, self.source, self.source_scale), (TARGET, self.target, self.target_scale)):
            near[name] = np.empty(len(queries), np.int64)
            dist[name] = knn_distance(queries, bank, k=k, chunk_size=chunk_size, device=device, bank_normalized=True,
                                      nearest=near[name]) / scale
        ids = {SOURCE: self.source_ids, TARGET: self.target_ids}
        from_target = dist[TARGET] < dist[SOURCE]
        out = []
        for i, t in enumerate(from_target):
            name = TARGET if t else SOURCE
            row = int(near[name][i])
            out.append(None if ids[name] is None or row < 0 else ids[name][row])
        return np.minimum(dist[SOURCE], dist[TARGET]), dist[SOURCE], dist[TARGET], out

    def train_scores(
        self,
        embeddings: np.ndarray,
        domains: Sequence[str | None],
        k: int = 1,
        chunk_size: int = 4096,
        device: str = "cpu",
        sample: int | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """Leave-one-out anomaly scores of the training clips this bank was built from.

        ``sample=N`` scores only N clips per domain drawn at random (the others get
        NaN), each still against every other clip: thresholds need a distribution,
        not all of it, and full leave-one-out is O(n^2) for a 100k-clip bank.

        ``embeddings`` / ``domains`` must be the ones passed to :meth:`build` (same
        clips, any order within a domain is fine). Each clip is scored against the
        uncondensed training clips of its own domain except itself, and against this
        bank's other-domain bank in full (i.e. a target clip meets the possibly
        condensed source bank, exactly as a test clip would); the score is the minimum
        of the two. Use the result with :func:`asd.algorithms.thresholds.fit_threshold`.

        Returns ``(n,)`` float32 scores in the order of ``embeddings``.
        """
        emb = l2_normalize(_as_matrix(embeddings, "embeddings"))
        if emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {emb.shape[1]}, bank has {self.dim}")
        is_target = _domain_mask(domains, emb.shape[0])
        n_target, n_source = int(is_target.sum()), int((~is_target).sum())
        if n_target != self.target.shape[0] or n_source != self.n_source_clips:
            raise ValueError(
                f"train_scores got {n_source} source / {n_target} target clips but the bank "
                f"was built from {self.n_source_clips} source / {self.target.shape[0]} target"
            )
        scores = np.empty(emb.shape[0], dtype=np.float32)
        kw = dict(k=k, chunk_size=chunk_size, device=device)
        rng = np.random.default_rng(seed)
        scale = {SOURCE: self.source_scale, TARGET: self.target_scale}
        for mask, own_name, other_bank, other_name in ((~is_target, SOURCE, self.target, TARGET),
                                                       (is_target, TARGET, self.source, SOURCE)):
            own = emb[mask]
            if own.shape[0] == 0:
                continue
            if sample is None or own.shape[0] <= sample:
                loo = _leave_one_out(own, k, None, chunk_size, device) / scale[own_name]
                other = knn_distance(own, other_bank, **kw) / scale[other_name]
                scores[mask] = np.minimum(loo, other)
                continue
            pick = np.sort(rng.choice(own.shape[0], size=sample, replace=False))
            loo = _leave_one_out(own, k, pick, chunk_size, device) / scale[own_name]
            other = knn_distance(own[pick], other_bank, **kw) / scale[other_name]
            part = np.full(own.shape[0], np.nan, dtype=np.float32)
            part[pick] = np.minimum(loo, other)
            scores[mask] = part
        return scores

    def __repr__(self) -> str:
        return (
            f"MemoryBank(source={self.source.shape}, target={self.target.shape}, "
            f"n_source_clips={self.n_source_clips}, condensed={self.condensed}, "
            f"scales=({self.source_scale:.4g}, {self.target_scale:.4g}))"
        )


@dataclass(eq=False)
class FusedBank:
    """Score-level fusion: one :class:`MemoryBank` per block of the embedding (a member of a
    ``concat`` embedder with ``fusion: score``) and the weighted sum of their scores.

    Each block is L2-normalised and searched on its own, so every member finds its own nearest
    neighbours; a clip's score is ``sum_b weight_b * min(source_b, target_b)``, and its per-bank
    columns are the weighted sums of the members' source and target distances.
    """

    banks: list[MemoryBank]
    weights: list[float]
    dims: list[int]

    def __post_init__(self) -> None:
        if not self.banks or not (len(self.banks) == len(self.weights) == len(self.dims)):
            raise ValueError("a fused bank needs one weight and one width per member bank")
        self.bounds = np.cumsum([0, *self.dims]).tolist()

    @classmethod
    def build(cls, embeddings: np.ndarray, domains: Sequence[str | None], blocks: Sequence[Mapping],
              condense_source: int | None = None, seed: int = 0, normalize: str | None = None,
              k: int = 1, ids: Sequence | None = None) -> FusedBank:
        """``blocks``: ``[{"dim", "weight"}, ...]`` in order, adding up to the embedding width."""
        emb = _as_matrix(embeddings, "embeddings")
        dims = [int(b["dim"]) for b in blocks]
        if sum(dims) != emb.shape[1]:
            raise ValueError(f"blocks of widths {dims} do not add up to the embedding width {emb.shape[1]}")
        bounds = np.cumsum([0, *dims])
        banks = [MemoryBank.build(emb[:, a:b], domains, condense_source=condense_source, seed=seed,
                                  normalize=normalize, k=k, ids=ids) for a, b in zip(bounds[:-1], bounds[1:])]
        return cls(banks=banks, weights=[float(b["weight"]) for b in blocks], dims=dims)

    def _parts(self, x: np.ndarray):
        x = _as_matrix(x, "queries")
        if x.shape[1] != self.bounds[-1]:
            raise ValueError(f"queries have dimension {x.shape[1]}, the fused bank {self.bounds[-1]}")
        return zip(self.banks, self.weights, (x[:, a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])))

    def score_parts(self, queries: np.ndarray, k: int = 1, device: str = "cpu"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(score, source, target)``: weighted sums over the member banks (see the class docstring)."""
        total = [np.zeros(len(queries), np.float64) for _ in range(3)]
        for bank, w, q in self._parts(queries):
            for acc, part in zip(total, bank.score_parts(q, k=k, device=device)):
                acc += w * part
        return tuple(t.astype(np.float32) for t in total)

    def score_nearest(self, queries: np.ndarray, k: int = 1, device: str = "cpu"
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """:meth:`score_parts` and, per query, the training clip nearest to it in the heaviest member
        (the first of equal weights; :meth:`MemoryBank.score_nearest`): each member finds its own
        neighbours, and the one with the largest share of the score names the clip."""
        heaviest = int(np.argmax(self.weights))
        total = [np.zeros(len(queries), np.float64) for _ in range(3)]
        names: list = [None] * len(queries)
        for i, (bank, w, q) in enumerate(self._parts(queries)):
            if i == heaviest:
                *parts, names = bank.score_nearest(q, k=k, device=device)
            else:
                parts = bank.score_parts(q, k=k, device=device)
            for acc, part in zip(total, parts):
                acc += w * part
        return (*(t.astype(np.float32) for t in total), names)

    def train_scores(self, embeddings: np.ndarray, domains: Sequence[str | None], k: int = 1,
                     sample: int | None = None, seed: int = 0) -> np.ndarray:
        """Leave-one-out training scores, fused as test scores are (same sampled clips in every member)."""
        total = None
        for bank, w, e in self._parts(embeddings):
            part = w * bank.train_scores(e, domains, k=k, sample=sample, seed=seed).astype(np.float64)
            total = part if total is None else total + part
        return total.astype(np.float32)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.banks)


def _leave_one_out(rows: np.ndarray, k: int, pick: np.ndarray | None = None, chunk_size: int = 4096,
                   device: str = "cpu") -> np.ndarray:
    """Mean kNN distance of each row (or of the rows ``pick``) to the other rows."""
    if pick is None:
        return knn_distance(rows, rows, k=k, chunk_size=chunk_size, exclude_self=True, device=device)
    # without the n x n product: each query's nearest of the k+1 is itself at distance 0, so the
    # mean of the other k is (k+1)/k times the mean
    kk = min(k, rows.shape[0] - 1)
    return knn_distance(rows[pick], rows, k=kk + 1, chunk_size=chunk_size, device=device) * (kk + 1) / kk


NORMALIZE = (None, "loo_mean")
SCALE_SAMPLE = 2000  # leave-one-out queries per bank for its scale


def bank_scales(source: np.ndarray, target: np.ndarray, normalize: str | None, k: int = 1) -> dict[str, float]:
    """Per-bank distance scales (see :meth:`MemoryBank.build`) of L2-normalised bank rows."""
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if normalize is None:
        return {SOURCE: 1.0, TARGET: 1.0}
    scales: dict[str, float | None] = {}
    for name, rows in ((SOURCE, source), (TARGET, target)):
        if rows.shape[0] < 2:
            scales[name] = None
            continue
        pick = None  # a large bank: a fixed sample of queries
        if rows.shape[0] > SCALE_SAMPLE:
            pick = np.sort(np.random.default_rng(0).choice(rows.shape[0], size=SCALE_SAMPLE, replace=False))
        mean = float(np.mean(_leave_one_out(rows, min(int(k), rows.shape[0] - 1), pick)))
        # identical clips (distance 0) give no scale either
        scales[name] = mean if mean > 1e-6 else None
    for name, other in ((SOURCE, TARGET), (TARGET, SOURCE)):
        if scales[name] is None:
            scales[name] = scales[other]
    return {name: (1.0 if v is None else v) for name, v in scales.items()}


def _kmeans_centroids(x: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """``n_clusters`` re-normalised k-means centroids of the (normalised) rows of ``x``.

    Uses :class:`sklearn.cluster.KMeans` for moderate sizes and
    :class:`~sklearn.cluster.MiniBatchKMeans` for large banks.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if x.shape[0] > 20_000:
        km = MiniBatchKMeans(
            n_clusters=n_clusters, n_init=3, random_state=seed, batch_size=4096
        )
    else:
        km = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
    km.fit(x)
    return l2_normalize(km.cluster_centers_.astype(np.float32))
