"""The DCASE autoencoder baseline end to end: its own front end through the featurize stage, the
published training of every machine type (one Ray task each), export of the trained types, and
scoring."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from asd.algorithms.thresholds import fit_threshold
from asd.baselines.autoencoder.model import (
    FEATURE_COLUMNS,
    AEConfig,
    Moments,
    TypeModel,
    feature_arrays,
    inverse_covariance,
    mahalanobis_term,
    train_type,
)
from asd.baselines.autoencoder.scoring import score_autoencoders
from asd.io import commitlog, layout, storage
from asd.stages.featurize import FeaturizeConfig, FeaturizeResult, featurize
from asd.stores.features import KEY_COLUMNS, read_commits, read_features_table

log = logging.getLogger(__name__)


def frontend_config(cfg: AEConfig, base: FeaturizeConfig | None = None) -> FeaturizeConfig:
    """The featurize stage's config for the baseline front end (batching etc. from ``base``)."""
    base = base or FeaturizeConfig()
    return replace(base, fbank=cfg.fbank(), modulation=replace(base.modulation, enabled=False))


def featurize_frontend(input_uri: str, root: str, cfg: AEConfig | None = None,
                       base: FeaturizeConfig | None = None) -> FeaturizeResult:
    """Featurize ``input_uri`` with the baseline's front end into ``<root>/baselines/ae``.

    Incremental like every featurize run; refuses a root whose features were made with other
    front-end settings (mixing them would silently corrupt the baseline).
    """
    cfg = cfg or AEConfig()
    fcfg = frontend_config(cfg, base)
    out = layout.ae_root(root)
    hashes = {c.get("config_hash") for c in read_commits(layout.features_dir(out))} - {None}
    if hashes - {fcfg.config_hash()}:
        raise ValueError(f"{layout.features_dir(out)!r} holds features of other front-end settings "
                         f"(config hash {sorted(hashes)} != {fcfg.config_hash()}); use a fresh root")
    return featurize(input_uri, out, fcfg)


# ----------------------------------------------------------------------------- training


@dataclass
class AETrainResult:
    models: str  # <root>/models/<tag> (published)
    per_type: dict  # machine type -> clips, vectors, losses, covariances, thresholds, ...
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def default_training_clips(table: pa.Table) -> list[str]:
    """The scoring stage's rule: clips of the train split that are not labelled anomalous."""
    is_train = pc.equal(table.column("split"), "train")
    anomalous = pc.fill_null(pc.equal(table.column("label"), "anomaly"), False)
    return table.filter(pc.and_(is_train, pc.invert(anomalous))).column("clip_id").to_pylist()


def train_autoencoders(features_root: str, out_root: str, cfg: AEConfig | None = None,
                       train_clips: Iterable[str] | None = None) -> AETrainResult:
    """Train one autoencoder per machine type on ``features_root`` (the baseline's front end, e.g.
    ``<root>/baselines/ae``) as published (:func:`asd.baselines.autoencoder.model.train_type`), one
    Ray task per type (``cfg.train_cpus`` each, reading its own clips); compute each type's
    covariances and thresholds; publish everything under ``<out_root>/models/<cfg.tag>/``.

    ``train_clips``: the clip ids to train on (default: the train split's clips not labelled anomalous).
    """
    import ray

    cfg = cfg or AEConfig()
    t0 = time.perf_counter()
    keys = read_features_table(features_root, columns=KEY_COLUMNS + ["num_mel_bins"])
    if keys.num_rows == 0:
        raise FileNotFoundError(f"no committed features under {layout.features_dir(features_root)!r}; "
                                "run featurize_frontend first")
    bins = set(keys.column("num_mel_bins").to_pylist())
    if bins != {cfg.n_mels}:
        raise ValueError(f"{layout.features_dir(features_root)!r} has {sorted(bins)} mel bins; the autoencoder "
                         f"expects {cfg.n_mels} (featurize with featurize_frontend)")
    ids = set(default_training_clips(keys) if train_clips is None else (str(c) for c in train_clips))
    known = set(keys.column("clip_id").to_pylist())
    if ids - known:
        raise ValueError(f"{len(ids - known)} training clip(s) have no features under {features_root!r}, "
                         f"e.g. {sorted(ids - known)[:3]}")
    if not ids:
        raise ValueError(f"no training clips under {features_root!r}: nothing to train the autoencoder on")
    chosen = keys.filter(pc.is_in(keys.column("clip_id"), pa.array(sorted(ids), pa.string())))
    by_type: dict[str, list[str]] = {}
    for c, mt in zip(chosen.column("clip_id").to_pylist(), chosen.column("machine_type").to_pylist()):
        by_type.setdefault(mt, []).append(c)
    if not ray.is_initialized():
        ray.init()
    task = ray.remote(_train_one_type)
    futures = {mt: task.options(num_cpus=cfg.train_cpus, name=f"autoencoder:{mt}").remote(features_root, mt, sorted(c), cfg)
               for mt, c in sorted(by_type.items())}
    log.info("training %d autoencoder(s), %d epochs each, one Ray task per machine type", len(futures), cfg.epochs)
    done = dict(zip(futures, ray.get(list(futures.values()))))
    out_uri = layout.models_dir(out_root, cfg.tag)
    staging = storage.staging_dir(out_uri)
    try:
        per_type = {mt: _write_type(staging, mt, cfg, res) for mt, res in sorted(done.items())}
        config = {
            "method": "DCASE 2023-2025 Task 2 autoencoder baseline (arXiv:2303.00455), as published",
            "ae": asdict(cfg), "frontend": asdict(cfg.fbank()), "features_root": features_root,
            "machine_types": per_type, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.atomic_write_json(storage.join(staging, "config.json"), config)
        commitlog.publish_dir(staging, out_uri, {"machine_types": sorted(per_type)})
    except BaseException:
        storage.remove(staging)  # nothing half-written is left beside the published models
        raise
    log.info("trained %d autoencoder(s) into %s in %.0f s", len(per_type), out_uri, time.perf_counter() - t0)
    return AETrainResult(models=out_uri, per_type=per_type, seconds=time.perf_counter() - t0)


def _train_one_type(features_root: str, machine_type: str, clip_ids: list[str], cfg: AEConfig) -> dict:
    """Body of one type's Ray task: train, then its covariances, training scores and thresholds."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asd").setLevel(logging.INFO)  # the epochs' progress reaches the driver's log
    torch.set_num_threads(max(1, int(cfg.train_cpus)))
    table = read_features_table(features_root, columns=KEY_COLUMNS + FEATURE_COLUMNS,
                                filter=pc.field("clip_id").isin(pa.array(clip_ids, pa.string())))
    table = table.sort_by("clip_id")
    arrays = feature_arrays(table)
    net, info = train_type(arrays, cfg)
    model = TypeModel(machine_type, cfg, net)
    domains = ["target" if d == "target" else "source" for d in table.column("domain").to_pylist()]
    moments = {"source": Moments(cfg.n_mels), "target": Moments(cfg.n_mels)}
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
    thresholds = {"ae_mse": float(fit_threshold(mse, "gamma", cfg.threshold_q)),
                  "ae_mahalanobis": float(fit_threshold(maha, "gamma", cfg.threshold_q))}
    buf = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "ae": asdict(cfg), "machine_type": machine_type}, buf)
    return {
        "weights": buf.getvalue(), "cov": cov, "inv_cov_source": model.inv_cov_source,
        "inv_cov_target": model.inv_cov_target, "thresholds": thresholds, "node_id": ray.get_runtime_context().get_node_id(),
        "info": {**info, "train_clips": len(arrays), "train_clips_source": domains.count("source"),
                 "train_clips_target": domains.count("target"), "error_rows_source": moments["source"].n,
                 "error_rows_target": moments["target"].n,
                 "target_covariance": "source (no target training clips)" if target_fallback else "target",
                 "train_mse_mean": float(mse.mean()), "train_mahalanobis_mean": float(maha.mean())},
    }


def _write_type(staging: str, mt: str, cfg: AEConfig, res: dict) -> dict:
    """One trained type's weights and covariances into ``staging``; its entry of config.json."""
    storage.atomic_write_bytes(storage.join(staging, mt, "autoencoder.pt"), res["weights"])
    buf = io.BytesIO()
    np.savez(buf, cov_source=res["cov"]["source"], cov_target=res["cov"]["target"],
             inv_cov_source=res["inv_cov_source"], inv_cov_target=res["inv_cov_target"])
    storage.atomic_write_bytes(storage.join(staging, mt, "mahalanobis.npz"), buf.getvalue())
    info = res["info"]
    log.info("autoencoder %s: %d training clips (%d source, %d target), %d vectors x %d epochs, loss %.4g -> %.4g "
             "(held-out %s), %.0f s", mt, info["train_clips"], info["train_clips_source"], info["train_clips_target"],
             info["train_vectors"], info["epochs"], info["first_loss"], info["final_loss"], info["final_val_loss"],
             info["seconds"])
    return {"weights": f"{mt}/autoencoder.pt", "mahalanobis": f"{mt}/mahalanobis.npz",
            "thresholds": res["thresholds"], "node_id": res["node_id"], **info}


# ----------------------------------------------------------------------------- the whole baseline


@dataclass
class BaselineResult:
    frontend: dict
    train: dict
    scores: dict  # score name -> asd.stages.score.ScoreResult as a dict

    def to_dict(self) -> dict:
        return asdict(self)


def run_baseline(input_uri: str, root: str, cfg: AEConfig | None = None, fcfg: FeaturizeConfig | None = None,
                 plots: bool = True) -> BaselineResult:
    """The baseline end to end on a DCASE-layout corpus: front end, per-type training on the train
    split, both scores of the test split written like the kNN scoring to
    ``<root>/scores/ae_mse`` and ``<root>/scores/ae_mahalanobis``."""
    from asd.stages.score import ScoreConfig, write_results

    cfg = cfg or AEConfig()
    feat = featurize_frontend(input_uri, root, cfg, fcfg)
    trained = train_autoencoders(layout.ae_root(root), root, cfg)
    scored = score_autoencoders(layout.ae_root(root), trained.models, cfg=cfg)
    results = {}
    for name, (table, thresholds) in scored.items():
        res = write_results(table, thresholds, layout.scores_dir(root, name), ScoreConfig(plots=plots),
                            title=f"DCASE autoencoder baseline, {name}", features_root=layout.ae_root(root))
        results[name] = res.to_dict()
    return BaselineResult(frontend=feat.to_dict(), train=trained.to_dict(), scores=results)


__all__ = ["AETrainResult", "BaselineResult", "default_training_clips", "featurize_frontend", "frontend_config",
           "run_baseline", "train_autoencoders"]
