"""The DCASE autoencoder baseline end to end: its own front end through the featurize stage,
one Ray Train run for every machine type, export of the trained types, and scoring."""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from asd.algorithms.thresholds import fit_threshold
from asd.io import commitlog, layout, storage
from asd.stages.featurize import (
    FeaturizeConfig,
    FeaturizeResult,
    featurize,
)
from asd.stores.features import (
    KEY_COLUMNS,
    load_stats,
    read_commits,
    read_features_table,
    write_feature_view,
)
from asd.training.checkpoints import load_training_state
from asd.training.fit import TrainResult, fit, stage_train_config
from asd.training.loop import TrainConfig

log = logging.getLogger(__name__)

from asd.baselines.autoencoder.model import (
    DB_PER_NEPER,
    FEATURE_COLUMNS,
    AEBank,
    AEConfig,
    AutoencoderObjective,
    TypeModel,
    _arrays,
    _Moments,
    default_train_config,
    inverse_covariance,
    mahalanobis_term,
    recalibrate_batchnorm,
)
from asd.baselines.autoencoder.scoring import score_autoencoders


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
    ``<root>/baselines/ae``) with :func:`asd.training.fit.fit`, compute each type's covariances and
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
    view = layout.training_view(features_root)
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


# ----------------------------------------------------------------------------- the whole baseline


@dataclass
class BaselineResult:
    frontend: dict
    train: dict
    scores: dict  # score name -> asd.stages.score.ScoreResult as a dict

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
    from asd.stages.score import ScoreConfig, write_results

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


__all__ = ["AETrainResult", "BaselineResult", "default_training_clips", "featurize_frontend", "frontend_config",
           "run_baseline", "train_autoencoders"]
