"""The data of a triage page (:mod:`asd.reports.triage`), gathered from a run root: for a night of
rescoring (:func:`night_page`) and for a scoring run (:func:`run_page`).

A scores table names each clip, its score, threshold and decision, and the training clip the score
came from (``neighbour_clip_id``). The rest comes from the feature stores: a clip's sensor faults
and measurements, where its recording is stored (``path``) and its log-mel matrix (the
spectrogram), for the night's clips from the night's own store and for the neighbours from the
served root's. The nightly trend is read from the published nights (``rescore/date=*/``).
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc

from asd.io import layout, storage
from asd.reports.metrics import result_csv_name
from asd.reports.triage import ClipRow, PageConfig, TriagePage, has_fault, rank_anomalies
from asd.stores.features import SENSOR_COLUMNS, fault_counts, matrix_array, matrix_columns, read_features_table

REPORT_DIR = "report"  # the page's folder inside a night's partition or a scoring run's folder
CLIP_COLUMNS = ["clip_id", "path", "duration_s", *SENSOR_COLUMNS]


def clip_facts(features_root: str, clip_ids: list[str] | None = None) -> dict[str, dict]:
    """clip_id -> path, duration and sensor columns of the committed features of ``features_root``
    (every clip, or those of ``clip_ids``); faults read as None where the store predates the checks."""
    filt = None if clip_ids is None else pc.field("clip_id").isin(pa.array(sorted(set(clip_ids)), pa.string()))
    t = read_features_table(features_root, columns=CLIP_COLUMNS, filter=filt)
    return {r["clip_id"]: r for r in t.to_pylist()}


def with_faults(scores: pa.Table, facts: dict[str, dict]) -> pa.Table:
    """``scores`` with a ``faults`` column (list of sensor-fault names; null where not checked)."""
    faults = [facts.get(c, {}).get("faults") for c in scores.column("clip_id").to_pylist()]
    col = pa.array(faults, pa.list_(pa.string()))
    if "faults" in scores.column_names:
        return scores.set_column(scores.schema.get_field_index("faults"), "faults", col)
    return scores.append_column("faults", col)


def counts(table: pa.Table) -> dict:
    """Clips, anomalies above threshold (all, and without a sensor fault) and sensor faults of a
    scores table with ``decision`` and ``faults``; the same per machine type under ``per_type``."""
    def part(rows: list[dict]) -> dict:
        return {"clips": len(rows), "anomalies_above_threshold": sum(int(r["decision"]) for r in rows),
                "anomalies": sum(int(r["decision"]) for r in rows if not r["faults"]),
                "sensor_faults": fault_counts([r["faults"] for r in rows])}
    rows = table.select(["machine_type", "decision", "faults"]).to_pylist()
    out = part(rows)
    out["per_type"] = {mt: part([r for r in rows if r["machine_type"] == mt])
                       for mt in sorted({r["machine_type"] for r in rows})}
    return out


def _rows(table: pa.Table, facts: dict[str, dict]) -> list[ClipRow]:
    cols = [c for c in ("clip_id", "machine_type", "section", "score", "threshold", "decision", "faults", "label",
                        "neighbour_clip_id") if c in table.column_names]
    out = []
    for r in table.select(cols).to_pylist():
        f = facts.get(r["clip_id"], {})
        out.append(ClipRow(clip_id=r["clip_id"], machine_type=r["machine_type"], section=r["section"],
                           score=float(r["score"]), threshold=float(r["threshold"]), decision=int(r["decision"]),
                           faults=r.get("faults"), label=r.get("label"), audio_uri=f.get("path"),
                           neighbour_clip_id=r.get("neighbour_clip_id"),
                           sensor={k: f.get(k) for k in ("rms_dbfs", "clipped_share", "zero_run_s", "dc_offset",
                                                         "duration_s")}))
    return out


def _groups(table: pa.Table) -> list[dict]:
    groups: dict = {}
    for r in table.select(["machine_type", "section", "threshold", "decision", "faults"]).to_pylist():
        g = groups.setdefault((r["machine_type"], r["section"]), {
            "machine_type": r["machine_type"], "section": r["section"], "clips": 0, "anomalies": 0,
            "sensor_faults": 0, "threshold": r["threshold"]})
        g["clips"] += 1
        g["sensor_faults"] += int(bool(r["faults"]))
        g["anomalies"] += int(bool(r["decision"]) and not r["faults"])
    return [groups[k] for k in sorted(groups)]


def _fbanks(features_root: str, clip_ids: list[str]) -> dict:
    if not clip_ids:
        return {}
    t = read_features_table(features_root, columns=["clip_id", *matrix_columns("fbank")],
                            filter=pc.field("clip_id").isin(pa.array(sorted(set(clip_ids)), pa.string())))
    return {r["clip_id"]: matrix_array(r) for r in t.to_pylist()}


def attach_media(top: list[ClipRow], features_root: str, neighbour_root: str, condensed: bool) -> None:
    """Spectrograms and recordings of the ``top`` clips (from ``features_root``) and of the
    training clips their scores came from (from ``neighbour_root``)."""
    own = _fbanks(features_root, [r.clip_id for r in top])
    wanted = [r.neighbour_clip_id for r in top if r.neighbour_clip_id]
    facts = clip_facts(neighbour_root, wanted) if wanted else {}
    theirs = _fbanks(neighbour_root, wanted)
    for r in top:
        r.fbank = own.get(r.clip_id)
        if r.neighbour_clip_id is None:
            r.neighbour_note = ("the score came from a k-means centroid of the condensed source bank "
                                "(score.condense_source): no single normal clip" if condensed else
                                "this score names no normal training clip")
            continue
        if r.neighbour_clip_id not in facts:
            r.neighbour_note = f"the normal clip {r.neighbour_clip_id} has no features under {neighbour_root}"
            r.neighbour_clip_id = None
            continue
        r.neighbour_audio_uri = facts[r.neighbour_clip_id]["path"]
        r.neighbour_fbank = theirs.get(r.neighbour_clip_id)


def _links(folder_files: list[str]) -> list[tuple[str, str]]:
    return [(name, f"../{name}") for name in folder_files]


def _csvs(table: pa.Table) -> list[str]:
    keys = sorted(set(zip(table.column("machine_type").to_pylist(), table.column("section").to_pylist())))
    return [result_csv_name(kind, mt, sec) for mt, sec in keys for kind in ("anomaly_score", "decision_result")]


def _fault_notes(c: dict) -> list[str]:
    n, bad = c["clips"], c["sensor_faults"]["clips"]
    if not n or not bad:
        return []
    kinds = ", ".join(f"{k} {v}" for k, v in c["sensor_faults"].items() if k != "clips")
    if bad == n:
        return [f"Every clip ({n}) has a sensor fault ({kinds}): check the microphones and recorders before "
                "reading any score; no clip is ranked as an anomaly."]
    return [f"{bad} of {n} clips have a sensor fault ({kinds}); they are listed apart from the anomalies."]


# --------------------------------------------------------------------------- a night


def published_nights(root: str) -> list[tuple[str, str]]:
    """``(date, partition uri)`` of every published night under ``<root>/rescore``, by date."""
    base = layout.rescore_dir(root)
    fs, path = storage.filesystem(base)
    if not fs.exists(path):
        return []
    out = []
    for p in fs.glob(posixpath.join(path, "date=*") if storage.is_remote(base) else f"{path}/date=*"):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        uri = layout.rescore_partition_dir(root, name[len("date="):])
        if storage.is_published(uri):
            out.append((name[len("date="):], uri))
    return sorted(out)


def nightly_trend(root: str, date: str, tonight: pa.Table, nights: int) -> dict:
    """Clips, anomalies without a sensor fault and sensor faults per machine type for the last
    ``nights`` nights up to ``date`` (earlier published nights read from their scores; ``tonight``
    is the night being published). Nights scored before the sensor checks count no faults."""
    import pyarrow.parquet as pq

    tables = {}
    for day, uri in published_nights(root):
        if day < date:
            f = storage.join(uri, "scores.parquet")
            fs, path = storage.filesystem(f)
            with fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                have = [c for c in ("machine_type", "decision", "faults") if c in pf.schema_arrow.names]
                tables[day] = pf.read(columns=have)
    tables[date] = tonight
    days = sorted(tables)[-max(1, nights):]
    types = sorted({mt for d in days for mt in tables[d].column("machine_type").to_pylist()})
    cells: dict[str, list] = {mt: [] for mt in types}
    for d in days:
        t = tables[d]
        faults = t.column("faults").to_pylist() if "faults" in t.column_names else [None] * t.num_rows
        per: dict = {}
        for mt, dec, f in zip(t.column("machine_type").to_pylist(), t.column("decision").to_pylist(), faults):
            c = per.setdefault(mt, [0, 0, 0])
            c[0] += 1
            c[1] += int(bool(dec) and not f)
            c[2] += int(bool(f))
        for mt in types:
            cells[mt].append(per.get(mt))
    return {"nights": days, "types": cells}


def night_page(root: str, date: str, table: pa.Table, work_root: str, model: dict, inbox: str, night: dict,
               cfg: PageConfig, condensed: bool) -> TriagePage:
    """The page of one night: ``table`` is the night's scores (with ``faults``); ``night`` says what
    this run found (``n_inbox``, ``n_new``, ``n_already_scored``, ``rejected``: reason -> count)."""
    facts = clip_facts(work_root) if table.num_rows else {}
    rows = _rows(table, facts)
    c = counts(table)
    notes = []
    rejected = night.get("rejected") or {}
    if not table.num_rows:
        if night["n_inbox"] == 0 and not rejected:
            notes.append(f"The inbox {inbox} held no recordings: nothing was scored.")
        elif night["n_inbox"] and night["n_already_scored"] == night["n_inbox"]:
            notes.append(f"All {night['n_inbox']} recordings of {inbox} were scored on earlier nights "
                         "(the same content): nothing new to score.")
    if rejected:
        what = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
        notes.append(f"{sum(rejected.values())} input file(s) could not be featurized and were not scored ({what}); "
                     f"the reasons are in {layout.features_dir(work_root)}/_quarantine/.")
    notes += _fault_notes(c)
    ranked = rank_anomalies(rows)
    attach_media(ranked[: cfg.top], work_root, root, condensed)
    links = _links(["scores.parquet", "summary.json", *(_csvs(table) if table.num_rows else [])])
    return TriagePage(
        title=f"Night of {date}: machine sound triage",
        subtitle=f"model {model['tag']} · inbox {inbox} · {c['clips']} clips",
        notes=notes,
        counts={"clips": c["clips"], "anomalies": c["anomalies"], "sensor_faults": c["sensor_faults"]["clips"],
                "rejected": sum(rejected.values())},
        groups=_groups(table), anomalies=ranked, faults=[r for r in rows if has_fault(r)],
        trend=nightly_trend(root, date, table, cfg.trend_nights), links=links,
        footer=[f"Score: cosine kNN distance of the clip's embedding ({model['tag']}) to the normal training clips "
                "of its machine type and section; decision: above the threshold fitted on those clips."])


# --------------------------------------------------------------------------- a scoring run


def run_page(scores: pa.Table, features_root: str | None, title: str, cfg: PageConfig, condensed: bool,
             files: list[str], figures: list[str]) -> TriagePage:
    """The page of a scoring run (``scores`` with ``faults``; ``files``, ``figures``: what the run's
    folder holds beside the page)."""
    facts = clip_facts(features_root, scores.column("clip_id").to_pylist()) if features_root else {}
    rows = _rows(scores, facts)
    c = counts(scores)
    notes = _fault_notes(c)
    if features_root is None:
        notes.append("The scoring run named no feature store: no spectrograms, audio or sensor checks.")
    ranked = rank_anomalies(rows)
    if features_root:
        attach_media(ranked[: cfg.top], features_root, features_root, condensed)
    return TriagePage(
        title=title, subtitle=f"{c['clips']} test clips scored", notes=notes,
        counts={"clips": c["clips"], "anomalies": c["anomalies"], "sensor_faults": c["sensor_faults"]["clips"]},
        groups=_groups(scores), anomalies=ranked, faults=[r for r in rows if has_fault(r)],
        figures=[(name, f"../{name}") for name in figures], links=_links(files + _csvs(scores)))
