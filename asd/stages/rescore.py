"""Nightly rescoring: score new recordings with the current model, incrementally and idempotently.

A night's recordings arrive under an inbox folder in DCASE layout
(``<inbox>/<machine_type>/test/<file>.wav``, e.g. ``s3://bucket/inbox/2026-11-25/``).
:func:`rescore`:

1. reads ``<root>/models/CURRENT`` (which embedder, with which parameters, and the
   embeddings folder whose training clips form the memory banks);
2. featurizes the inbox into ``<root>/rescore/_work/date=<day>/`` (the featurize
   stage's own commits make this incremental and crash-safe);
3. embeds those features with the current embedder;
4. under the nightly store's lease (``rescore/_lease``, :class:`asd.io.commitlog.Lease`): drops
   clips whose content hash is already scored (``rescore/date=*/scores.parquet``), scores the
   rest against the current banks and thresholds and publishes the day's partition
   ``<root>/rescore/date=<day>/`` (scores.parquet with the day's old and new rows, DCASE CSVs,
   summary.json) in one atomic step.

Running a night twice changes nothing; a run that dies before step 4 leaves the
partition as it was, and its rerun produces the same table an uninterrupted run
would have (rows are keyed by content hash and sorted by clip id). Runs that overlap (a slow
night and the next, a manual rerun during the scheduled one) score every clip once: the
feature store's commit log keeps each clip once in ``_work``, and the lease makes the second
run see the first one's rows before it decides what is new; each run's summary counts what it
scored itself (``n_new``) and what it found already scored (``n_already_scored``).
"""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd.io import commitlog, layout, storage
from asd.io.layout import rescore_dir, rescore_partition_dir
from asd.io.serving import current_model
from asd.models.embedders import FEATURE_EMBEDDERS
from asd.resources import DeviceConfig
from asd.stages.embed import EmbedConfig, embed
from asd.stages.featurize import FeaturizeConfig, featurize
from asd.stages.score import (
    ScoreConfig,
    build_banks,
    score_table,
    training_embeddings,
    write_dcase_csvs,
)
from asd.stores.embeddings import embedding_blocks, read_embeddings

log = logging.getLogger(__name__)

RESCORE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("content_sha256", pa.string()),
        ("machine_type", pa.string()),
        ("section", pa.string()),
        ("score", pa.float32()),
        ("threshold", pa.float32()),
        ("decision", pa.int8()),
        ("model", pa.string()),
        ("date", pa.string()),
    ]
)


@dataclass
class RescoreConfig:
    """The night's featurization, its embedding actors (the embedder and its parameters are the
    served model's, from ``models/CURRENT``), scoring, and where model-backed embedding runs."""

    featurize: FeaturizeConfig = field(default_factory=lambda: FeaturizeConfig(progress=False))
    embed: EmbedConfig = field(default_factory=lambda: EmbedConfig(progress=False))
    score: ScoreConfig = field(default_factory=ScoreConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)


@dataclass
class RescoreResult:
    date: str
    partition: str
    model: str
    n_inbox: int
    n_new: int
    n_already_scored: int
    n_quarantined: int
    n_anomalies: int
    changed: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)




def scored_hashes(root: str) -> set[str]:
    """Content hashes scored on every published night so far."""
    base = rescore_dir(root)
    fs, path = storage.filesystem(base)
    if not fs.exists(path):
        return set()
    seen: set[str] = set()
    for p in fs.glob(posixpath.join(path, "date=*", "scores.parquet") if storage.is_remote(base)
                     else f"{path}/date=*/scores.parquet"):
        uri = storage.to_uri(fs, p)
        if storage.is_published(posixpath.dirname(uri) if storage.is_remote(uri) else p.rsplit("/", 1)[0]):
            seen.update(storage.read_table(uri, columns=["content_sha256"]).column("content_sha256").to_pylist())
    return seen


def rescore(inbox: str, root: str, date: str | None = None, cfg: RescoreConfig | None = None) -> RescoreResult:
    """Score the recordings under ``inbox`` that no earlier night scored; publish ``rescore/date=<day>``."""
    cfg = cfg or RescoreConfig()
    t0 = time.perf_counter()
    date = date or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    dt.date.fromisoformat(date)  # a bad date is an error, not a folder name
    model = current_model(root)
    storage.check_reachable(inbox)

    work = layout.rescore_work_dir(root, date)
    feat = featurize(inbox, work, cfg.featurize)
    ecfg = replace(cfg.embed, embedder=model["embedder"], params=model.get("params", {}))
    emb = embed(work, model["tag"], cfg.device.for_embedding(ecfg, runs_a_model=ecfg.embedder not in FEATURE_EMBEDDERS))
    night = read_embeddings(emb.embeddings)
    out = rescore_partition_dir(root, date)
    # What was scored and what this run adds are decided and published under one lease over the
    # nightly store, so overlapping runs (a slow night and the next, a manual rerun) score every
    # clip once: the second finds the first's rows and adds only what is left.
    with commitlog.Lease(layout.rescore_lease_uri(root)):
        return _score_and_publish(root, night, out, model, feat, date, inbox, cfg, t0)


def _score_and_publish(root, night, out, model, feat, date, inbox, cfg, t0) -> RescoreResult:
    """The critical section of :func:`rescore` (under the nightly store's lease)."""
    seen = scored_hashes(root)
    new = night.filter(pc.invert(pc.is_in(night.column("content_sha256"), pa.array(sorted(seen), pa.string()))))
    old = (storage.read_table(storage.join(out, "scores.parquet")) if storage.is_published(out)
           else RESCORE_SCHEMA.empty_table())
    if new.num_rows == 0:
        log.info("rescore %s: nothing new in %s (%d clips already scored)", date, inbox, night.num_rows)
        return _result(date, out, model, night, new, feat, old, changed=False, t0=t0)
    banks, thresholds = build_banks(training_embeddings(model["embeddings"]), cfg.score,
                                    embedding_blocks(model["embeddings"]))
    scored = score_table(new, banks, thresholds, cfg.score.k)
    rows = pa.table({
        "clip_id": scored.column("clip_id"),
        "content_sha256": new.column("content_sha256"),
        "machine_type": scored.column("machine_type"),
        "section": scored.column("section"),
        "score": scored.column("score"),
        "threshold": scored.column("threshold"),
        "decision": scored.column("decision"),
        "model": pa.array([model["tag"]] * scored.num_rows, pa.string()),
        "date": pa.array([date] * scored.num_rows, pa.string()),
    }, schema=RESCORE_SCHEMA)
    table = pa.concat_tables([old.select(RESCORE_SCHEMA.names).cast(RESCORE_SCHEMA), rows]).sort_by("clip_id")
    _publish_night(table, out, model, date)
    return _result(date, out, model, night, new, feat, table, changed=True, t0=t0)


def _publish_night(table: pa.Table, out: str, model: dict, date: str) -> None:
    staging = storage.staging_dir(out)
    storage.write_table(storage.join(staging, "scores.parquet"), table)
    write_dcase_csvs(staging, table)
    rows = table.to_pylist()
    summary = {
        "date": date,
        "model": model["tag"],
        "clips": len(rows),
        "anomalies_above_threshold": int(sum(r["decision"] for r in rows)),
        "per_type": {mt: {"clips": sum(r["machine_type"] == mt for r in rows),
                          "anomalies": int(sum(r["decision"] for r in rows if r["machine_type"] == mt))}
                     for mt in sorted({r["machine_type"] for r in rows})},
    }
    storage.atomic_write_json(storage.join(staging, "summary.json"), summary)
    commitlog.publish_dir(staging, out, {"rows": len(rows)})


def _result(date, out, model, night, new, feat, table, changed, t0) -> RescoreResult:
    decisions = table.column("decision").to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
    res = RescoreResult(
        date=date, partition=out, model=model["tag"], n_inbox=night.num_rows, n_new=new.num_rows,
        n_already_scored=night.num_rows - new.num_rows, n_quarantined=feat.n_quarantined,
        n_anomalies=int(decisions.sum()), changed=changed, seconds=time.perf_counter() - t0,
    )
    log.info("rescore %s: %d new clips scored with %s, %d anomalies above threshold on the night -> %s",
             date, res.n_new, res.model, res.n_anomalies, out)
    return res
