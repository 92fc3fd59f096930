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
   summary.json and the triage page ``report/index.html``, :mod:`asd.stages.triage`) in one
   atomic step.

Each clip carries its sensor faults (found at featurize, :mod:`asd.data.sensor`) and the training
clip its score came from; the summary and the page count sensor faults apart from anomalies. A
night with nothing to score (an empty inbox, every clip rejected or scored on an earlier night) is
published once, empty, so that its page says what happened.

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
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd.io import commitlog, layout, storage
from asd.io.layout import rescore_partition_dir
from asd.io.serving import current_model
from asd.models.embedders import FEATURE_EMBEDDERS
from asd.resources import DeviceConfig
from asd.stages import triage
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
from asd.stores.features import KEY_COLUMNS, committed_files, read_commits

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
        ("faults", pa.list_(pa.string())),  # sensor faults found at featurize ([] none; null: not checked)
        ("neighbour_clip_id", pa.string()),  # the training clip the score came from (asd.stages.score)
    ]
)


def conform(table: pa.Table) -> pa.Table:
    """A night's scores in :data:`RESCORE_SCHEMA`: nights published before a column existed read it as null."""
    for f in RESCORE_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table.select(RESCORE_SCHEMA.names).cast(RESCORE_SCHEMA)


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
    n_sensor_faults: int = 0  # clips of the night with a sensor fault (scored, not counted as anomalies)
    page: str | None = None  # the night's triage page

    def to_dict(self) -> dict:
        return asdict(self)




def scored_hashes(root: str) -> set[str]:
    """Content hashes scored on every published night so far."""
    seen: set[str] = set()
    for _, night in triage.published_nights(root):
        uri = storage.join(night, "scores.parquet")
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
    # the served root's training clips tell each machine type's usual length (the "short" sensor check)
    feat = featurize(inbox, work, cfg.featurize, reference_root=root)
    if committed_files(work):
        ecfg = replace(cfg.embed, embedder=model["embedder"], params=model.get("params", {}))
        emb = embed(work, model["tag"], cfg.device.for_embedding(ecfg, runs_a_model=ecfg.embedder not in FEATURE_EMBEDDERS))
        night = read_embeddings(emb.embeddings)
    else:  # an empty inbox, or every file rejected: nothing to embed
        night = pa.schema([(c, pa.string()) for c in KEY_COLUMNS]).empty_table()
    out = rescore_partition_dir(root, date)
    # What was scored and what this run adds are decided and published under one lease over the
    # nightly store, so overlapping runs (a slow night and the next, a manual rerun) score every
    # clip once: the second finds the first's rows and adds only what is left.
    with commitlog.Lease(layout.rescore_lease_uri(root)):
        return _score_and_publish(root, night, out, model, feat, date, inbox, cfg, t0, work)


def _score_and_publish(root, night, out, model, feat, date, inbox, cfg, t0, work) -> RescoreResult:
    """The critical section of :func:`rescore` (under the nightly store's lease)."""
    seen = scored_hashes(root)
    new = night.filter(pc.invert(pc.is_in(night.column("content_sha256"), pa.array(sorted(seen), pa.string()))))
    published = storage.is_published(out)
    old = conform(storage.read_table(storage.join(out, "scores.parquet"))) if published else RESCORE_SCHEMA.empty_table()
    about = {"n_inbox": night.num_rows, "n_new": new.num_rows, "n_already_scored": night.num_rows - new.num_rows,
             "rejected": _rejected(work)}
    if new.num_rows == 0:
        log.info("rescore %s: nothing new in %s (%d clips already scored)", date, inbox, night.num_rows)
        if published:
            page = storage.join(out, triage.REPORT_DIR, "index.html")
            return _result(date, out, model, night, new, feat, old, changed=False, t0=t0,
                           page=page if storage.exists(page) else None)
        # the night's first run: publish it empty, so that its page and summary say why
        page = _publish_night(old, out, model, date, root=root, work=work, inbox=inbox, about=about, cfg=cfg)
        return _result(date, out, model, night, new, feat, old, changed=True, t0=t0, page=page)
    banks, thresholds = build_banks(training_embeddings(model["embeddings"]), cfg.score,
                                    embedding_blocks(model["embeddings"]))
    scored = score_table(new, banks, thresholds, cfg.score.k)
    facts = triage.clip_facts(work, new.column("clip_id").to_pylist())
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
        "faults": pa.array([facts.get(c, {}).get("faults") for c in scored.column("clip_id").to_pylist()],
                           pa.list_(pa.string())),
        "neighbour_clip_id": scored.column("neighbour_clip_id"),
    }, schema=RESCORE_SCHEMA)
    table = pa.concat_tables([old, rows]).sort_by("clip_id")
    page = _publish_night(table, out, model, date, root=root, work=work, inbox=inbox, about=about, cfg=cfg)
    return _result(date, out, model, night, new, feat, table, changed=True, t0=t0, page=page)


def _rejected(work: str) -> dict[str, int]:
    """Inputs of the night's inbox rejected at featurize, by reason (every run of the night)."""
    out: dict[str, int] = {}
    for c in read_commits(layout.features_dir(work)):
        for reason, n in c.get("rejects", {}).items():
            out[reason] = out.get(reason, 0) + n
    return out


def _publish_night(table: pa.Table, out: str, model: dict, date: str, *, root: str, work: str, inbox: str,
                   about: dict, cfg: RescoreConfig) -> str | None:
    """Write the night's scores, CSVs, summary and page into a staging folder and publish it whole."""
    staging = storage.staging_dir(out)
    storage.write_table(storage.join(staging, "scores.parquet"), table)
    write_dcase_csvs(staging, table)
    c = triage.counts(table)
    page = None
    if cfg.score.page.enabled:
        built = triage.night_page(root, date, table, work, model, inbox, about, cfg.score.page,
                                  condensed=cfg.score.condense_source is not None)
        from asd.reports.triage import write_page

        write_page(storage.join(staging, triage.REPORT_DIR), built, cfg.score.page,
                   sample_rate=cfg.featurize.fbank.sample_rate)
        page = storage.join(out, triage.REPORT_DIR, "index.html")
    summary = {
        "date": date,
        "model": model["tag"],
        "clips": c["clips"],
        # every clip above its threshold, and those of them without a sensor fault
        "anomalies_above_threshold": c["anomalies_above_threshold"],
        "anomalies": c["anomalies"],
        "sensor_faults": c["sensor_faults"],  # clips with any sensor fault, and per fault
        "rejected": about["rejected"],  # inputs that could not be featurized, by reason
        "per_type": c["per_type"],
        "page": None if page is None else f"{triage.REPORT_DIR}/index.html",
    }
    storage.atomic_write_json(storage.join(staging, "summary.json"), summary)
    commitlog.publish_dir(staging, out, {"rows": table.num_rows})
    return page


def _result(date, out, model, night, new, feat, table, changed, t0, page=None) -> RescoreResult:
    decisions = table.column("decision").to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
    res = RescoreResult(
        date=date, partition=out, model=model["tag"], n_inbox=night.num_rows, n_new=new.num_rows,
        n_already_scored=night.num_rows - new.num_rows, n_quarantined=feat.n_quarantined,
        n_anomalies=int(decisions.sum()), changed=changed, seconds=time.perf_counter() - t0,
        n_sensor_faults=triage.counts(table)["sensor_faults"]["clips"] if table.num_rows else 0,
        page=page,
    )
    log.info("rescore %s: %d new clips scored with %s, %d anomalies above threshold on the night -> %s",
             date, res.n_new, res.model, res.n_anomalies, out)
    return res
