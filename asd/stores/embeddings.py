"""The embedding store: ``<root>/embeddings/<tag>/``, one row per featurized clip keyed by
``clip_id`` (the key columns below and ``embedding``, a fixed-size float32 list), published with
``_SUCCESS`` (which records the embedder, its parameters and, for score-level fusion, the
blocks). Written by :func:`asd.stages.embed.embed`; read by scoring, clustering and rescoring, which
need neither the embedders nor torch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from asd.io import storage


def embedding_blocks(uri: str) -> list[dict] | None:
    """The block layout recorded with a published embeddings folder (:func:`asd.models.embedders.embedder_blocks`)."""
    info = storage.read_json(storage.join(uri, storage.SUCCESS)) or {}
    return info.get("blocks")



def read_embeddings(uri: str, published: bool = True, columns: list[str] | None = None, filter=None) -> pa.Table:
    """An embeddings folder as an Arrow table sorted by clip_id (requires ``_SUCCESS``)."""
    if published:
        storage.require_published(uri)
    table = storage.read_table(uri, columns=columns, filters=filter)
    return table.sort_by("clip_id")


def vectors(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as an ``(n, d)`` float32 array."""
    col = table.column("embedding").combine_chunks()
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32, copy=False)
