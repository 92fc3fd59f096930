"""Ward clustering of one machine type's embeddings: the algorithm, without Ray or plots.

Two ways to build the Ward tree of one type's ``(n, d)`` embeddings:

* :func:`ward_exact` (``n <= WardConfig.exact_max_points``): scipy's Ward over
  all points. The condensed Euclidean distance matrix is filled block by block
  with BLAS (``|a|^2 + |b|^2 - 2 a.b``) instead of ``pdist``; memory is about two
  condensed matrices (``n^2 * 8`` bytes: 3.2 GB at 20k points).
* :func:`ward_chunked` (larger types): the points are streamed in chunks into
  ``n_micro`` micro-clusters (``sklearn.cluster.MiniBatchKMeans.partial_fit``),
  every point is assigned to its nearest micro-centroid, the *exact* means and
  sizes of those micro-clusters are accumulated, and Ward is run over the
  micro-clusters *with their sizes* (:func:`ward_weighted`, the Lance-Williams
  Ward update started from the micro-cluster sizes). Ward's merge cost of two
  groups depends only on their sizes and means, so this is exactly Ward's
  agglomeration constrained to start from the micro-partition. No ``n x n``
  matrix ever exists: memory is ``O(n_micro^2 + chunk_size * d)`` plus one int32
  label per point. Every point takes its micro-cluster's final label.

The number of clusters is fixed (``n_clusters``) or chosen automatically
(:func:`choose_n_clusters`: the largest gap between successive merge heights,
or the best silhouette on a sample, over ``auto_range``). :func:`cluster_type` does all of it
for one type; degenerate types (fewer than ``min_clips`` clips, or identical embeddings) get a
single cluster and a logged warning instead of an error.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

AUTO_METHODS = ("gap", "silhouette")


# --------------------------------------------------------------------------- #
# Configuration and results
# --------------------------------------------------------------------------- #
@dataclass
class WardConfig:
    """How to cluster one machine type.

    ``n_clusters=None`` chooses the count automatically within ``auto_range``
    (inclusive) by ``auto_method``: ``"gap"`` (largest gap between successive Ward
    merge heights) or ``"silhouette"`` (best silhouette of the cut on a sample of
    ``silhouette_sample`` points). The pseudo-label stage's config
    (:class:`asd.stages.pseudo_label.PseudoLabelConfig`) adds what its Ray tasks ask for.
    """

    exact_max_points: int = 20_000  # exact Ward up to this many clips of a type
    n_micro: int = 4096  # micro-clusters of the chunked path (2k-10k)
    chunk_size: int = 65_536  # rows per streamed chunk
    n_clusters: int | None = None  # None: automatic
    auto_range: tuple[int, int] = (2, 16)
    auto_method: str = "gap"  # gap (largest ratio of successive merge heights) | silhouette
    silhouette_sample: int = 2000
    min_clips: int = 4  # a type with fewer clips gets one cluster (with a warning)
    kmeans_passes: int = 1  # MiniBatchKMeans passes over re-iterable data before assignment
    kmeans_fit_rows: int | None = 262_144  # arrays: rows sampled at random per pass to fit (None: all)
    seed: int = 0

    def __post_init__(self):
        self.auto_range = tuple(int(v) for v in self.auto_range)  # Hydra gives lists
        if len(self.auto_range) != 2 or self.auto_range[0] < 1 or self.auto_range[1] < self.auto_range[0]:
            raise ValueError(f"auto_range must be (lo, hi) with 1 <= lo <= hi, got {self.auto_range}")
        if self.auto_method not in AUTO_METHODS:
            raise ValueError(f"auto_method must be one of {AUTO_METHODS}, got {self.auto_method!r}")
        if self.n_micro < 2 or self.chunk_size < 1:
            raise ValueError("n_micro must be >= 2 and chunk_size >= 1")
        if self.n_clusters is not None and int(self.n_clusters) < 1:
            raise ValueError(f"n_clusters must be >= 1 or None, got {self.n_clusters}")


@dataclass
class ClusterResult:
    """Clusters of one machine type (or one domain of it).

    ``labels``: one int per point, 0 = largest cluster. ``method``: ``"exact"``,
    ``"chunked"`` or ``"trivial"`` (degenerate input, one cluster). ``linkage``:
    scipy linkage matrix over the leaves (points, or micro-clusters for the chunked
    path; empty for trivial). ``sizes``: points per cluster. ``leaf_sizes``: points
    per leaf of the linkage (None for exact = all ones).
    """

    labels: np.ndarray
    n_clusters: int
    method: str
    linkage: np.ndarray
    sizes: list[int]
    chosen_by: str = "fixed"  # fixed | gap | silhouette | degenerate
    leaf_sizes: np.ndarray | None = None
    warning: str | None = None
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"n_clusters": self.n_clusters, "method": self.method, "sizes": list(self.sizes),
                "chosen_by": self.chosen_by, "n_points": int(len(self.labels)),
                "n_leaves": int(len(self.linkage) + 1) if len(self.linkage) else int(min(len(self.labels), 1)),
                "warning": self.warning, "seconds": round(self.seconds, 3)}


class ChunkedWard(NamedTuple):
    """Result of :func:`ward_chunked` (unpacks as a 4-tuple)."""

    micro_labels: np.ndarray  # (n,) int32: micro-cluster of every point
    centroids: np.ndarray  # (m, d) float64: exact means of the micro-clusters
    sizes: np.ndarray  # (m,) int64: points per micro-cluster
    linkage: np.ndarray  # (m - 1, 4) size-weighted Ward over the centroids


# --------------------------------------------------------------------------- #
# Ward trees
# --------------------------------------------------------------------------- #
def _l2n(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        x = np.where(np.isfinite(x), x, 0).astype(dtype, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12).astype(dtype)


def _condensed_euclidean(x: np.ndarray, block_bytes: int = 1 << 28) -> np.ndarray:
    """Condensed Euclidean distances of the rows of ``x`` (float64), filled with BLAS blocks."""
    n = len(x)
    out = np.empty(n * (n - 1) // 2, np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    rows = max(1, int(block_bytes // (8 * max(n, 1))))
    pos = 0
    for i0 in range(0, n - 1, rows):
        i1 = min(n - 1, i0 + rows)
        g = x[i0:i1] @ x[i0:].T  # (b, n - i0)
        g *= -2.0
        g += sq[i0:i1, None]
        g += sq[None, i0:]
        np.maximum(g, 0.0, out=g)
        np.sqrt(g, out=g)
        for r in range(i1 - i0):
            seg = g[r, r + 1:]
            out[pos:pos + len(seg)] = seg
            pos += len(seg)
    return out


def ward_exact(x: np.ndarray) -> np.ndarray:
    """Ward linkage (scipy format) of the L2-normalised rows of ``x``.

    Same result as ``scipy.cluster.hierarchy.linkage(l2n(x), "ward")``; the
    distances are computed with BLAS rather than ``pdist`` (much faster at d=768).
    """
    from scipy.cluster.hierarchy import linkage

    xn = _l2n(x, np.float64)
    if len(xn) < 2:
        return np.zeros((0, 4), np.float64)
    return linkage(_condensed_euclidean(xn), method="ward")


def ward_weighted(centroids: np.ndarray, sizes: np.ndarray | None = None) -> np.ndarray:
    """Ward linkage of weighted points: cluster ``i`` starts with ``sizes[i]`` points at ``centroids[i]``.

    Nearest-neighbour chain over a dense ``m x m`` matrix of Ward merge costs,
    updated with the Lance-Williams Ward formula

        D(k, i+j)^2 = ((n_k+n_i) D(k,i)^2 + (n_k+n_j) D(k,j)^2 - n_k D(i,j)^2) / (n_k+n_i+n_j)

    started from ``D(i,j)^2 = 2 n_i n_j / (n_i+n_j) |c_i - c_j|^2``: the same
    heights as scipy's Ward when all sizes are 1, and the exact Ward merge costs of
    the underlying point groups otherwise. ``O(m^2)`` memory (float64), ``O(m^2)``
    numpy work per merge row; ~1 s for m=4096. Column 3 of the result counts
    leaves (as scipy requires); point counts per node: :func:`node_point_counts`.
    """
    c = np.asarray(centroids, np.float64)
    m = len(c)
    w = np.ones(m, np.float64) if sizes is None else np.asarray(sizes, np.float64).reshape(-1)
    if len(w) != m:
        raise ValueError(f"{m} centroids but {len(w)} sizes")
    if (w <= 0).any():
        raise ValueError("sizes must be positive")
    if m < 2:
        return np.zeros((0, 4), np.float64)
    sq = np.einsum("ij,ij->i", c, c)
    D = c @ c.T
    D *= -2.0
    D += sq[:, None]
    D += sq[None, :]
    np.maximum(D, 0.0, out=D)
    D *= 2.0 * w[:, None]
    D *= w[None, :]
    D /= w[:, None] + w[None, :]
    np.fill_diagonal(D, np.inf)

    size = w.copy()
    active = np.ones(m, bool)
    merged_a = np.empty(m - 1, np.int64)
    merged_b = np.empty(m - 1, np.int64)
    heights2 = np.empty(m - 1, np.float64)
    chain: list[int] = []
    first_active = 0
    for step in range(m - 1):
        if not chain:
            while not active[first_active]:
                first_active += 1
            chain.append(first_active)
        while True:
            a = chain[-1]
            row = D[a]
            b = int(np.argmin(row))
            if len(chain) > 1:
                prev = chain[-2]
                if row[prev] <= row[b]:  # ties: prefer the previous link, so the chain ends
                    b = prev
                if b == prev:
                    break
            chain.append(b)
        b = chain.pop()
        a = chain.pop()
        dab = D[a, b]
        na, nb = size[a], size[b]
        keep, drop = (a, b) if a < b else (b, a)
        new = (size + na) * D[a]
        new += (size + nb) * D[b]
        new -= size * dab
        new /= size + (na + nb)
        D[keep, :] = new
        D[:, keep] = new
        D[keep, keep] = np.inf
        D[drop, :] = np.inf
        D[:, drop] = np.inf
        size[keep] = na + nb
        active[drop] = False
        merged_a[step], merged_b[step], heights2[step] = a, b, dab
    return _linkage_from_merges(merged_a, merged_b, np.sqrt(np.maximum(heights2, 0.0)), m)


def _linkage_from_merges(a: np.ndarray, b: np.ndarray, h: np.ndarray, m: int) -> np.ndarray:
    """Sort NN-chain merges by height and renumber them as scipy does (union-find over leaves)."""
    order = np.argsort(h, kind="mergesort")
    parent = list(range(2 * m - 1))
    count = [1] * m + [0] * (m - 1)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    Z = np.empty((m - 1, 4), np.float64)
    for i, j in enumerate(order):
        x, y = find(int(a[j])), find(int(b[j]))
        if x > y:
            x, y = y, x
        new = m + i
        parent[x] = parent[y] = new
        count[new] = count[x] + count[y]
        Z[i] = (x, y, h[j], count[new])
    return Z


def node_point_counts(Z: np.ndarray, leaf_sizes: np.ndarray | None) -> np.ndarray:
    """Points under every node (leaves first, then merges) of a linkage with weighted leaves."""
    m = len(Z) + 1
    counts = np.ones(2 * m - 1, np.int64)
    if leaf_sizes is not None:
        counts[:m] = leaf_sizes
    for i, (x, y) in enumerate(Z[:, :2].astype(np.int64)):
        counts[m + i] = counts[x] + counts[y]
    return counts


def _chunk_source(data, chunk_size: int) -> tuple[Callable[[], Iterable[np.ndarray]], bool, int | None]:
    """(make an iterator of chunks, re-iterable?, total rows if known)."""
    if isinstance(data, np.ndarray):  # includes np.memmap
        n = len(data)
        return (lambda: (data[i:i + chunk_size] for i in range(0, n, chunk_size))), True, n
    if callable(data):
        return data, True, None
    if isinstance(data, (list, tuple)):
        return (lambda: iter(data)), True, None
    it = iter(data)
    return (lambda: it), False, None


def _assign(x: np.ndarray, centers: np.ndarray, centers_sq: np.ndarray, block_floats: int = 1 << 25) -> np.ndarray:
    """Index of the nearest centre of every row (squared Euclidean), in bounded-memory blocks."""
    out = np.empty(len(x), np.int32)
    rows = max(256, block_floats // max(len(centers), 1))
    for i in range(0, len(x), rows):
        s = x[i:i + rows] @ centers.T
        s *= -2.0
        s += centers_sq
        out[i:i + rows] = np.argmin(s, axis=1)
    return out


def ward_chunked(data, cfg: WardConfig | None = None) -> ChunkedWard:
    """Size-weighted Ward over micro-clusters of streamed chunks (never an ``n x n`` matrix).

    ``data``: an ``(n, d)`` array (a ``np.memmap`` streams from disk), a callable
    returning a fresh iterator of ``(rows, d)`` chunks (re-iterable), or a one-shot
    iterable of chunks. Rows are L2-normalised chunk by chunk.

    Re-iterable data: ``cfg.kmeans_passes`` passes of
    ``MiniBatchKMeans(n_micro).partial_fit`` over the chunks (for an array: over
    ``cfg.kmeans_fit_rows`` rows sampled at random, in random order, so sorted
    inputs such as source-then-target clips still spread the centres), then one
    pass that assigns every point to its nearest final centre. A one-shot iterator is
    assigned on the fly (each chunk right after its ``partial_fit``). Either way
    the micro-centroids returned are the *exact* means of the points assigned to
    them, so :func:`ward_weighted` over (centroids, sizes) is exact Ward started
    from that partition. With ``n <= n_micro`` every point is its own
    micro-cluster (then this is exact Ward).
    """
    from scipy import sparse
    from sklearn.cluster import MiniBatchKMeans

    cfg = cfg or WardConfig()
    make_iter, reiterable, n_known = _chunk_source(data, cfg.chunk_size)
    m = int(cfg.n_micro)
    if n_known is not None and n_known <= m:
        x = _l2n(data, np.float64)
        ones = np.ones(len(x), np.int64)
        return ChunkedWard(np.arange(len(x), dtype=np.int32), x, ones, ward_weighted(x, ones))

    km = MiniBatchKMeans(n_clusters=m, init="random", n_init=1, random_state=cfg.seed,
                         batch_size=min(cfg.chunk_size, 4096), compute_labels=False, reassignment_ratio=0.01)
    fitted = False
    buffer: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    sums = counts = None

    def accumulate(x: np.ndarray, lab: np.ndarray) -> None:
        nonlocal sums, counts
        if sums is None:
            sums = np.zeros((m, x.shape[1]), np.float64)
            counts = np.zeros(m, np.int64)
        onehot = sparse.csr_matrix((np.ones(len(x), np.float32), (lab, np.arange(len(x)))), shape=(m, len(x)))
        sums += onehot @ x
        counts += np.bincount(lab, minlength=m)
        labels.append(lab)

    def fit(x: np.ndarray, assign_now: bool) -> None:
        nonlocal fitted
        if not fitted:
            buffer.append(x)
            if sum(len(b) for b in buffer) < m:
                return  # the first partial_fit needs at least n_micro rows
            x = np.concatenate(buffer)
            buffer.clear()
        km.partial_fit(x)
        fitted = True
        if assign_now:
            centers = km.cluster_centers_.astype(np.float32)
            accumulate(x, _assign(x, centers, np.einsum("ij,ij->i", centers, centers)))

    passes = max(1, int(cfg.kmeans_passes)) if reiterable else 1
    rng = np.random.default_rng(cfg.seed)
    for p in range(passes):
        if n_known is not None:  # an array: fit on a random sample of rows, in random order
            n_fit = n_known if cfg.kmeans_fit_rows is None else min(n_known, max(int(cfg.kmeans_fit_rows), m))
            pick = rng.permutation(n_known)[:n_fit]
            fit_chunks = (data[np.sort(pick[i:i + cfg.chunk_size])] for i in range(0, n_fit, cfg.chunk_size))
        else:
            fit_chunks = make_iter()
        for chunk in fit_chunks:
            fit(_l2n(chunk), assign_now=not reiterable)
        if not fitted:  # fewer than n_micro rows in total: every point is a micro-cluster
            x = np.concatenate(buffer).astype(np.float64) if buffer else np.zeros((0, 0))
            ones = np.ones(len(x), np.int64)
            return ChunkedWard(np.arange(len(x), dtype=np.int32), x, ones, ward_weighted(x, ones))
    if reiterable:
        centers = km.cluster_centers_.astype(np.float32)
        centers_sq = np.einsum("ij,ij->i", centers, centers)
        for chunk in make_iter():
            x = _l2n(chunk)
            accumulate(x, _assign(x, centers, centers_sq))

    micro = np.concatenate(labels)
    used = np.flatnonzero(counts)
    remap = np.full(m, -1, np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    micro = remap[micro]
    sizes = counts[used]
    centroids = sums[used] / sizes[:, None]
    return ChunkedWard(micro, centroids, sizes, ward_weighted(centroids, sizes))


# --------------------------------------------------------------------------- #
# Cutting the tree
# --------------------------------------------------------------------------- #
def cut(linkage: np.ndarray, n: int) -> np.ndarray:
    """Leaf labels ``0..k-1`` of the cut of ``linkage`` into ``n`` clusters (``k <= n`` on ties)."""
    from scipy.cluster.hierarchy import fcluster

    Z = np.asarray(linkage, np.float64)
    m = len(Z) + 1
    n = int(max(1, min(int(n), m)))
    if len(Z) == 0 or n == 1:
        return np.zeros(m if len(Z) else 1, np.int32)
    return (fcluster(Z, n, criterion="maxclust") - 1).astype(np.int32)


def cut_height(linkage: np.ndarray, k: int) -> float:
    """A height that cuts ``linkage`` into ``k`` clusters (midway between two merges)."""
    h = np.sort(np.asarray(linkage)[:, 2])
    m = len(h) + 1
    if k <= 1:
        return float(h[-1]) * 1.01 + 1e-12
    lo = h[m - k - 1] if m - k - 1 >= 0 else 0.0
    return float((lo + h[m - k]) / 2)


def choose_n_clusters(linkage: np.ndarray, cfg: WardConfig | None = None, x_sample: np.ndarray | None = None,
                      sample_leaves: np.ndarray | None = None) -> int:
    """Number of clusters within ``cfg.auto_range`` (inclusive, capped at the number of leaves).

    ``"gap"``: the cut with the largest gap between the merge height that would
    undo it and the one below it (a clear jump in Ward's merge cost), measured on
    log heights, i.e. the largest ratio (raw differences favour small k because
    Ward heights grow with cluster size).
    ``"silhouette"``: the cut with the best silhouette on ``x_sample`` (Euclidean on
    L2-normalised rows); ``sample_leaves[i]`` is the leaf of the linkage that
    ``x_sample[i]`` belongs to (default: row ``i`` is leaf ``i``). Without a sample
    the silhouette method falls back to the gap, with a warning.
    """
    cfg = cfg or WardConfig()
    Z = np.asarray(linkage, np.float64)
    m = len(Z) + 1
    if len(Z) == 0:
        return 1
    lo, hi = cfg.auto_range
    hi = min(hi, m - 1 if m > 2 else m)  # every leaf its own cluster is no clustering
    lo = min(lo, hi)
    if hi <= 1:
        return 1
    method = cfg.auto_method
    if method == "silhouette" and (x_sample is None or len(x_sample) < 3):
        log.warning("silhouette cluster count needs a sample of points; using the largest gap instead")
        method = "gap"
    if method == "gap":
        # gaps of log heights (ratios): Ward heights grow with cluster size, so raw
        # differences would favour the smallest k
        h = np.sort(Z[:, 2])
        logh = np.log(np.maximum(h, max(float(h[-1]), 1e-300) * 1e-9))
        best_k, best_gap = lo, -np.inf
        for k in range(max(lo, 2), hi + 1):
            below = logh[m - k - 1] if m - k - 1 >= 0 else logh[0]  # k == m only when m == 2
            gap = logh[m - k] - below
            if gap > best_gap + 1e-12:
                best_k, best_gap = k, gap
        return int(best_k)

    from scipy.spatial.distance import pdist, squareform
    from sklearn.metrics import silhouette_score

    xs = _l2n(x_sample, np.float64)
    leaves = np.arange(len(xs)) if sample_leaves is None else np.asarray(sample_leaves)
    dist = squareform(pdist(xs))
    best_k, best_s = max(lo, 2), -np.inf
    for k in range(max(lo, 2), hi + 1):
        labs = cut(Z, k)[leaves]
        n_lab = len(np.unique(labs))
        if n_lab < 2 or n_lab >= len(xs):
            continue
        s = float(silhouette_score(dist, labs, metric="precomputed"))
        if s > best_s + 1e-12:
            best_k, best_s = k, s
    return int(best_k)


# --------------------------------------------------------------------------- #
# One machine type
# --------------------------------------------------------------------------- #
def _all_identical(x: np.ndarray, chunk: int = 65_536, tol: float = 1e-6) -> bool:
    """True when every (L2-normalised) row equals the first one; streams in chunks."""
    if len(x) < 2:
        return True
    ref = _l2n(x[:1], np.float64)[0]
    for i in range(0, len(x), chunk):
        if np.abs(_l2n(x[i:i + chunk], np.float64) - ref).max() > tol:
            return False
    return True


def _order_by_size(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Renumber cluster labels so that 0 is the largest cluster (ties: first seen)."""
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    remap = np.empty(int(uniq.max()) + 1 if len(uniq) else 0, np.int32)
    remap[uniq[order]] = np.arange(len(uniq), dtype=np.int32)
    return remap[labels], [int(c) for c in counts[order]]


def cluster_type(embeddings: np.ndarray, cfg: WardConfig | None = None, name: str = "") -> ClusterResult:
    """Ward clusters of one machine type's ``(n, d)`` embeddings (exact or chunked by size)."""
    cfg = cfg or WardConfig()
    t0 = time.perf_counter()
    x = np.asarray(embeddings)
    n = len(x)
    what = f"{name}: " if name else ""
    if x.ndim != 2 and n:
        raise ValueError(f"{what}embeddings must be 2-D, got shape {x.shape}")

    def trivial(reason: str) -> ClusterResult:
        msg = f"{what}{reason}; assigning one cluster"
        log.warning(msg)
        return ClusterResult(np.zeros(n, np.int32), 1 if n else 0, "trivial", np.zeros((0, 4)),
                             [n] if n else [], "degenerate", None, msg, time.perf_counter() - t0)

    if n < max(cfg.min_clips, 2):
        return trivial(f"only {n} clip(s) (< min_clips={cfg.min_clips})")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        log.warning("%snon-finite embedding values replaced by 0", what)
    if _all_identical(x):
        return trivial(f"all {n} embeddings are identical")

    leaf_sizes = None
    if n <= cfg.exact_max_points:
        method, Z, micro = "exact", ward_exact(x), None
    else:
        method = "chunked"
        cw = ward_chunked(x, cfg)
        Z, micro, leaf_sizes = cw.linkage, cw.micro_labels, cw.sizes
    m = len(Z) + 1

    if cfg.n_clusters is not None:
        k, chosen_by = int(min(cfg.n_clusters, m)), "fixed"
    else:
        chosen_by = cfg.auto_method
        x_sample = leaves = None
        if cfg.auto_method == "silhouette":
            rng = np.random.default_rng(cfg.seed)
            idx = np.sort(rng.choice(n, size=min(n, cfg.silhouette_sample), replace=False))
            x_sample = x[idx]
            leaves = idx if micro is None else micro[idx]
        k = choose_n_clusters(Z, cfg, x_sample, leaves)
    leaf_labels = cut(Z, k)
    labels = leaf_labels if micro is None else leaf_labels[micro]
    labels, sizes = _order_by_size(labels)
    res = ClusterResult(labels, len(sizes), method, Z, sizes, chosen_by, leaf_sizes, None, time.perf_counter() - t0)
    log.info("%s%d clips -> %d clusters (%s, %s) in %.1f s", what, n, res.n_clusters, method, chosen_by, res.seconds)
    return res


def estimate_memory_gb(n: int, d: int, cfg: WardConfig | None = None) -> float:
    """A generous estimate of the heap a per-type task needs for ``n`` embeddings of dimension ``d``."""
    cfg = cfg or WardConfig()
    overhead = 0.5 * 2**30
    if n <= cfg.exact_max_points:
        need = n * d * 8 * 2 + 2 * (n * (n - 1) // 2) * 8 + 2**28 + n * n  # x64, condensed + scipy copy, block
    else:
        m = cfg.n_micro
        chunk = min(cfg.chunk_size, n)
        need = (chunk * d * 4 * 4 + m * m * 8 * 1.5 + 2**27 + m * d * 8 * 3 + n * 4 * 3)
    return float(math.ceil((need + overhead) / 2**30 * 4) / 4)
