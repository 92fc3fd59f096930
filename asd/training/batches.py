"""Training batches from feature rows: normalised random crops, reshuffled every epoch.

:class:`FeatureBatches` turns passes over Arrow feature rows (a Ray Data shard's
``iter_batches`` or slices of an in-memory table, :func:`table_batches`) into batches of random
crops of ``crop_frames`` frames (short clips tiled), caching small shards in worker memory and
keeping the epoch/batch position exact on resume.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from asd.models.encoder import FBANK_MEAN, FBANK_STD
from asd.stores.features import matrix_array, matrix_columns
from asd.training.loop import TrainConfig

# ----------------------------------------------------------------------------- data


def fbank_norm(cfg: TrainConfig, root: str | None = None) -> tuple[float, float]:
    """Scalar (mean, std) used as ``(fbank - mean) / (2 * std)`` (BEATs' form)."""
    if cfg.norm == "beats" or root is None:
        return FBANK_MEAN, FBANK_STD
    from asd.stores.features import load_stats

    stats = load_stats(root)["all"]
    mean = np.asarray(stats["mean"], np.float64)
    std = np.asarray(stats["std"], np.float64)
    m = float(mean.mean())
    s = float(np.sqrt(np.mean(std**2 + mean**2) - m**2))
    return m, s


def crop_batch(arrays: list[np.ndarray], crop: int, rng: np.random.Generator, mean: float, std: float) -> torch.Tensor:
    """(B, crop, bins) normalised random crops; clips shorter than ``crop`` are tiled
    (wrap-around from a random offset), so no padding mask is needed."""
    bins = arrays[0].shape[1]
    out = np.empty((len(arrays), crop, bins), np.float32)
    for i, a in enumerate(arrays):
        frames = a.shape[0]
        if frames >= crop:
            start = int(rng.integers(0, frames - crop + 1))
            out[i] = a[start : start + crop]
        else:
            offset = int(rng.integers(0, frames))
            idx = (offset + np.arange(crop)) % frames
            out[i] = a[idx]
    out -= mean
    out /= 2.0 * std
    return torch.from_numpy(out)


class FeatureBatches:
    """Epochs of training batches ``{"fbank": (B, crop, bins) float32, <column>: list}``; the
    ``"fbank"`` entry holds the feature matrix ``matrix`` (log-mel by default, or the modulation
    spectrum ``mod``) whatever it is.

    ``read_pass(epoch)`` yields Arrow batches of feature rows for one pass (a Ray Data
    shard's ``iter_batches``, or slices of a table). With ``cache=True`` the whole pass is
    read once, kept in memory (fbank as stored, float16) in ``clip_id`` order, and every
    epoch is a fresh permutation of it; otherwise every epoch streams a new pass. Orders are
    seeded by (seed, rank, epoch) and crops by (seed, rank, epoch, batch), so a run resumed
    inside an epoch (``skip``) sees exactly the batches the uninterrupted run would have.

    ``weights(extras) -> (n,)`` (an objective's ``sample_weights``, mean about 1 over the
    training set) turns an epoch into weighted sampling: cached, an epoch draws as many rows as
    there are, with replacement, in proportion to the weights; streamed, each row is repeated
    ``floor(w)`` or ``ceil(w)`` times (stochastic rounding) and the repeats spread by the batches.
    """

    def __init__(
        self,
        read_pass: Callable[[int], Iterable[pa.Table | pa.RecordBatch]],
        cfg: TrainConfig,
        *,
        columns: Iterable[str] = (),
        matrix: str = "fbank",
        norm: tuple[float, float] = (FBANK_MEAN, FBANK_STD),
        rank: int = 0,
        cache: bool = False,
        weights: Callable[[list[dict]], np.ndarray] | None = None,
    ):
        self.read_pass = read_pass
        self.weights = weights
        self.cfg = cfg
        self.columns = tuple(columns)
        self.matrix_cols = matrix_columns(matrix)
        self.matrix = matrix
        self.norm = norm
        self.rank = rank
        self.cache = cache
        self._cached: list[tuple[np.ndarray, dict, str]] | None = None
        self._w: np.ndarray | None = None

    def _rows(self, batch) -> list[tuple[np.ndarray, dict, str]]:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        names = set(batch.column_names)
        wanted = self.matrix_cols + [c for c in self.columns if c not in self.matrix_cols]
        if "clip_id" in names and "clip_id" not in wanted:
            wanted.append("clip_id")
        return [(matrix_array(r, self.matrix, as_stored=True), {c: r[c] for c in self.columns},
                 str(r.get("clip_id") or "")) for r in batch.select(wanted).to_pylist()]

    def _collate(self, rows: list, epoch: int, index: int) -> dict:
        rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, index, 2])
        arrays = [a.astype(np.float32) for a, _, _ in rows]
        batch: dict[str, Any] = {"fbank": crop_batch(arrays, self.cfg.crop_frames, rng, *self.norm)}
        for c in self.columns:
            batch[c] = [extra[c] for _, extra, _ in rows]
        return batch

    def _cached_weights(self) -> np.ndarray:
        if self._w is None:
            w = np.asarray(self.weights([extra for _, extra, _ in self._cached]), np.float64)
            if w.shape != (len(self._cached),) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
                raise ValueError("sample weights must be finite, non-negative, one per row, and not all zero")
            self._w = w
        return self._w

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """The batches of one epoch, the first ``skip`` left out (resume inside an epoch)."""
        bs = self.cfg.batch_size
        if self.cache and self._cached is None:
            rows = [row for part in self.read_pass(epoch) for row in self._rows(part)]
            if not rows:
                return
            self._cached = sorted(rows, key=lambda r: r[2])
        if self._cached is not None:
            rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, 1])
            if self.weights is not None:
                w = self._cached_weights()
                order = rng.choice(len(self._cached), size=len(self._cached), replace=True, p=w / w.sum())
            else:
                order = rng.permutation(len(self._cached))
            for i, start in enumerate(range(0, len(order), bs)):
                if i >= skip:
                    yield self._collate([self._cached[j] for j in order[start : start + bs]], epoch, i)
            return
        pending: list = []
        index = 0
        rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, 3])
        for part in self.read_pass(epoch):
            rows = self._rows(part)
            if self.weights is not None and rows:
                w = np.asarray(self.weights([extra for _, extra, _ in rows]), np.float64)
                reps = np.floor(w).astype(int) + (rng.random(len(w)) < w - np.floor(w))
                rows = [rows[i] for i in rng.permutation(np.repeat(np.arange(len(rows)), reps))]
            pending.extend(rows)
            while len(pending) >= bs:
                chunk, pending = pending[:bs], pending[bs:]
                if index >= skip:
                    yield self._collate(chunk, epoch, index)
                index += 1
        if pending and index >= skip:
            yield self._collate(pending, epoch, index)


def table_batches(table: pa.Table, cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> Callable[[int], Iterator[pa.Table]]:
    """``read_pass`` over an in-memory table of feature rows (no Ray): this rank's share,
    reshuffled per epoch."""
    share = table.take(list(range(rank, table.num_rows, world_size)))

    def read_pass(epoch: int) -> Iterator[pa.Table]:
        order = np.random.default_rng([cfg.seed, rank, epoch, 2]).permutation(share.num_rows)
        shuffled = share.take(order)
        for start in range(0, shuffled.num_rows, cfg.batch_size):
            yield shuffled.slice(start, cfg.batch_size)

    return read_pass
