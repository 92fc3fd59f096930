"""Embeddings of clips, computed over the feature Parquet with Ray Data.

One interface: an *embedder* maps lists of feature matrices, one list per name in its
``inputs`` (default ``("fbank",)``: log-mel ``(frames, bins)``; ``mod``: the modulation
spectrum), to an ``(n, d)`` float32 array. :func:`embed` applies one over every committed
feature row with ``map_batches`` on an actor pool (the embedder, e.g. a model, is
built once per actor; GPU actors when asked for, fractional CPUs otherwise) and
writes ``<root>/embeddings/<tag>/`` keyed by ``clip_id``.

Embedders (log-mel statistics, encoders, ensembles) live in :mod:`asd.models.embedders`; the
store they write, in :mod:`asd.stores.embeddings`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from asd.io import commitlog, storage
from asd.io.layout import embeddings_dir
from asd.models.embedders import (
    embedder_blocks,
    embedder_inputs,
    make_embedder,
)
from asd.resources import require as require_resources
from asd.stores.embeddings import read_embeddings
from asd.stores.features import (
    KEY_COLUMNS,
    matrix_arrays,
    matrix_columns,
    read_features_ray,
)

log = logging.getLogger(__name__)


@dataclass
class EmbedConfig:
    embedder: str = "logmel_stats"
    params: dict = field(default_factory=dict)
    batch_size: int = 64
    num_actors: int = 2
    num_cpus: float = 0.5  # per actor; fractions keep a 2-core box from hanging
    num_gpus: float = 0.0  # per actor; 1 for model-backed embedders on GPU nodes
    progress: bool = True


@dataclass
class EmbedResult:
    embeddings: str
    n_clips: int
    dim: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def actor_device_params(params: Any, gpu: bool) -> Any:
    """``params`` with every ``device: auto`` (members of a ``concat`` included) made ``cuda`` when
    the actor was given a GPU and ``cpu`` when not. Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for a
    worker given no GPU, so "auto" alone would put an actor that asked for none on a GPU it shares
    unasked."""
    if isinstance(params, dict):
        return {k: (("cuda" if gpu else "cpu") if k == "device" and v == "auto" else actor_device_params(v, gpu))
                for k, v in params.items()}
    if isinstance(params, list):
        return [actor_device_params(v, gpu) for v in params]
    return params


class _EmbedActor:
    """Ray Data callable class: builds the embedder once per actor."""

    def __init__(self, name: str, params: dict):
        import ray
        import torch

        torch.set_num_threads(1)
        self.embedder = make_embedder(name, actor_device_params(params, gpu=bool(ray.get_gpu_ids())))
        self.inputs = tuple(getattr(self.embedder, "inputs", ("fbank",)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.embedder(*[matrix_arrays(batch, m) for m in self.inputs])
        dim = out.shape[1] if out.ndim == 2 and len(out) else 0
        flat = pa.array(np.ascontiguousarray(out, dtype=np.float32).reshape(-1), type=pa.float32())
        vec = pa.FixedSizeListArray.from_arrays(flat, dim) if dim else pa.array([], pa.list_(pa.float32(), 0))
        cols = {c: batch.column(c) for c in KEY_COLUMNS}
        cols["embedding"] = vec
        return pa.table(cols)




def embed(root: str, tag: str, cfg: EmbedConfig | None = None) -> EmbedResult:
    """Embed every committed feature row of ``root`` into ``<root>/embeddings/<tag>``."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    cfg = cfg or EmbedConfig()
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init()
    require_resources({"CPU": cfg.num_cpus, "GPU": cfg.num_gpus}, max(1, cfg.num_actors), f"embedding {tag}",
                      hint="Set the embed config's num_actors, num_cpus or num_gpus to what the cluster has.")
    DataContext.get_current().enable_progress_bars = cfg.progress
    inputs = embedder_inputs(cfg.embedder, cfg.params)
    blocks = embedder_blocks(cfg.embedder, cfg.params)  # before any work: a member without a width fails now
    ds = read_features_ray(root, columns=KEY_COLUMNS + [c for m in inputs for c in matrix_columns(m)])
    ds = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs=dict(name=cfg.embedder, params=dict(cfg.params)),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=max(1, cfg.num_actors)),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
    )
    final = embeddings_dir(root, tag)
    staging = storage.staging_dir(final)
    afs, path = storage.arrow_filesystem(staging)
    ds.write_parquet(path, filesystem=afs)
    table = read_embeddings(staging, published=False, columns=["clip_id", "embedding"])
    dim = table.schema.field("embedding").type.list_size if table.num_rows else 0
    info = {"embedder": cfg.embedder, "params": cfg.params, "rows": table.num_rows, "dim": dim}
    if blocks is not None:
        if table.num_rows and sum(b["dim"] for b in blocks) != dim:
            raise ValueError(f"{cfg.embedder}: blocks {blocks} do not add up to the embedding width {dim}")
        info["blocks"] = blocks
    commitlog.publish_dir(staging, final, info)
    elapsed = time.perf_counter() - t0
    log.info("embedded %d clips (dim %d) with %s into %s in %.1f s", table.num_rows, dim, cfg.embedder, final, elapsed)
    return EmbedResult(embeddings=final, n_clips=table.num_rows, dim=dim, seconds=elapsed)
