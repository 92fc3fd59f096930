"""Scoring clips with trained autoencoders (AE-MSE and AE-Mahalanobis), on a Ray Data actor pool;
the result tables are :data:`asd.stages.score.SCORE_SCHEMA`'s, so they are written like kNN scores."""

from __future__ import annotations

import io
import logging
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch

from asd.baselines.autoencoder.model import (
    FEATURE_COLUMNS,
    AEConfig,
    AENet,
    TypeModel,
    feature_arrays,
)
from asd.io import storage
from asd.stages.score import SCORE_SCHEMA
from asd.stores.features import KEY_COLUMNS, read_features_ray

log = logging.getLogger(__name__)


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
        out[mt] = TypeModel(mt, cfg, net, maha["inv_cov_source"], maha["inv_cov_target"], dict(info["thresholds"]),
                            info)
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
    for row, fb in zip(keys, feature_arrays(batch)):
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
    """Per score (``ae_mse``, ``ae_mahalanobis``): a :data:`asd.stages.score.SCORE_SCHEMA` table sorted by
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
            "neighbour_clip_id": pa.nulls(len(rows), pa.string()),  # a reconstruction score has no neighbour
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
    :func:`asd.stages.score.write_results`."""
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


__all__ = ["load_autoencoders", "score_autoencoders", "score_rows", "score_tables"]
