"""The feature store: what a featurized row holds, its commit log, and how committed files are read.

``<root>/features/`` holds Parquet files partitioned by machine type and section
(``machine_type=<t>/section=<s>/<run>-<part>.parquet``) and a commit log ``_log/<seq>.json``
(:class:`asd.io.commitlog.CommitLog`): one entry per committing featurize run, naming its files, its
clip keys, its rejects and its partial normalisation sums. A file is visible only once an entry
names it, so readers never see half a run; entries are created put-if-absent in one order, and a
run that finds a concurrent run's entry naming some of its clips drops them first
(:func:`drop_clips`), so every clip key is in the store once whatever runs overlap.
:mod:`asd.stages.featurize` computes the rows and commits them through :func:`commit_run`; the
training, embedding and scoring stages read it through this module, which needs neither Ray (its
Ray Dataset reader imports Ray when called) nor an audio decoder. Stores written before the log
(``_commits/<run>.json``) are read as they are.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd.data.manifest import MANIFEST_SCHEMA, PROBLEM_SCHEMA
from asd.io import layout, storage
from asd.io.commitlog import CommitLog

log = logging.getLogger(__name__)

PARTITION_COLS = ["machine_type", "section"]

FEATURE_SCHEMA = pa.schema(
    [f for f in MANIFEST_SCHEMA if f.name not in ("size_bytes",)]
    + [
        pa.field("num_mel_bins", pa.int32()),
        pa.field("fbank_frames", pa.int32()),
        pa.field("fbank_dtype", pa.string()),
        pa.field("fbank", pa.binary()),
        # per-bin sums over frames (float64), so normalisation statistics need no second pass
        pa.field("fbank_sum", pa.list_(pa.float64())),
        pa.field("fbank_sumsq", pa.list_(pa.float64())),
        # modulation spectrum (ModulationConfig): (mod_bins, mod_bands) raw bytes; null when disabled
        pa.field("mod_bands", pa.int32()),
        pa.field("mod_bins", pa.int32()),
        pa.field("mod_dtype", pa.string()),
        pa.field("mod", pa.binary()),
        # long-term power spectrum (SpectrumConfig): (spec_bins, 1) raw bytes; null when disabled
        pa.field("spec_bins", pa.int32()),
        pa.field("spec_dtype", pa.string()),
        pa.field("spec", pa.binary()),
        # sensor-fault checks (asd.data.sensor) of the decoded clip: the faults found (names of
        # asd.data.sensor.FAULTS; [] none, null not checked) and what was measured; stores featurized
        # before the checks read as null (read_features_table)
        pa.field("faults", pa.list_(pa.string())),
        pa.field("rms_dbfs", pa.float32()),
        pa.field("clipped_share", pa.float32()),
        pa.field("zero_run_s", pa.float32()),
        pa.field("dc_offset", pa.float32()),
        pa.field("run_id", pa.string()),
    ]
)

SENSOR_COLUMNS = ["faults", "rms_dbfs", "clipped_share", "zero_run_s", "dc_offset"]


# The feature matrix is raw float16/float32 bytes, a different value for every clip: dictionary
# encoding never pays (Parquet hashes every 256 KiB value before giving up), snappy saves 0.2 % on
# log-mel bytes, and min/max statistics of such values are useless. Left on, they cost about three
# quarters of a feature file's write (benchmarks/featurize.py). Every other column keeps pyarrow's
# defaults. Every writer of feature files uses these options.
RAW_COLUMNS = ("fbank", "mod", "spec")
FEATURE_WRITE_OPTIONS = dict(
    use_dictionary=[f.name for f in FEATURE_SCHEMA if f.name not in RAW_COLUMNS],
    write_statistics=[f.name for f in FEATURE_SCHEMA if f.name not in RAW_COLUMNS],
    compression={f.name: "none" if f.name in RAW_COLUMNS else "snappy" for f in FEATURE_SCHEMA},
)


# The matrices a feature row stores: name -> (bytes, dtype, rows, columns) columns; a number for
# rows or columns is the same for every row (not stored).
MATRICES = {
    "fbank": ("fbank", "fbank_dtype", "fbank_frames", "num_mel_bins"),  # log-mel: (frames, mel bins)
    "mod": ("mod", "mod_dtype", "mod_bins", "mod_bands"),  # modulation spectrum: (modulation bins, bands)
    "spec": ("spec", "spec_dtype", "spec_bins", 1),  # long-term power spectrum: (frequency bins, 1)
}
DISABLED_BY = {"mod": "modulation.enabled=false", "spec": "spectrum.enabled=false"}  # how a matrix is left out


# the columns that identify a clip and its role, in every store keyed by clip (features, embeddings)
KEY_COLUMNS = ["clip_id", "machine_type", "section", "domain", "split", "label", "content_sha256"]


def matrix_columns(name: str = "fbank") -> list[str]:
    """The feature columns that hold matrix ``name`` (one of :data:`MATRICES`)."""
    try:
        return [c for c in MATRICES[name] if isinstance(c, str)]
    except KeyError:
        raise ValueError(f"unknown feature matrix {name!r}; known: {sorted(MATRICES)}") from None


def matrix_array(row: dict, name: str = "fbank", as_stored: bool = False) -> np.ndarray:
    """Matrix ``name`` of a feature row as float32 (``as_stored``: in its stored dtype, a view of
    the row's bytes); a row without it raises ValueError naming the clip."""
    data, dtype, rows, cols = MATRICES[name]
    if row.get(data) is None:
        raise ValueError(f"clip {row.get('clip_id', '?')!r} has no {name!r} features (featurized with "
                         f"{DISABLED_BY.get(name, 'another front end')}, or before it existed); featurize the "
                         "corpus into a fresh root with it enabled")
    shape = tuple(int(row[n]) if isinstance(n, str) else n for n in (rows, cols))
    arr = np.frombuffer(row[data], dtype=np.dtype(row[dtype])).reshape(shape)
    return arr if as_stored else arr.astype(np.float32)


def matrix_arrays(table: pa.Table, name: str = "fbank") -> list[np.ndarray]:
    """Matrix ``name`` of every row of an Arrow table or batch."""
    wanted = matrix_columns(name) + (["clip_id"] if "clip_id" in table.column_names else [])
    return [matrix_array(r, name) for r in table.select(wanted).to_pylist()]


def fbank_array(row: dict) -> np.ndarray:
    """The (frames, bins) float32 log-mel matrix of a feature row."""
    return matrix_array(row, "fbank")


def fbank_arrays(table: pa.Table) -> list[np.ndarray]:
    """Log-mel matrices of every row of an Arrow table or batch."""
    return matrix_arrays(table, "fbank")




LOG = "_log"  # the store's commit log (asd.io.commitlog.CommitLog): one entry per committing run
LEGACY_COMMITS = "_commits"  # commit records of stores written before the log (read, never written)


def feature_log(fdir: str) -> CommitLog:
    return CommitLog(storage.join(fdir, LOG))


def read_commits(fdir: str, log: bool = True) -> list[dict]:
    """The store's commits, in commit order: the records of the layout before the commit log
    (``_commits/<run>.json``, read as they are) first, then the log's entries (``log=False``:
    the old records only)."""
    out = []
    fs, path = storage.filesystem(storage.join(fdir, LEGACY_COMMITS))
    if fs.exists(path):
        for p in sorted(fs.glob(posixpath.join(path, "*.json") if "://" in fdir else f"{path}/*.json")):
            with fs.open(p, "rb") as f:
                out.append(json.loads(f.read()))
    if log:
        out += [entry for _, entry in feature_log(fdir).entries()]
    return out


def committed_keys(commits: list[dict]) -> tuple[dict[str, str], dict[str, str | None]]:
    """(clip_id -> sha256 of committed features, clip_id -> sha256 of quarantined clips)."""
    known: dict[str, str] = {}
    rejected: dict[str, str | None] = {}
    for c in commits:
        known.update(c.get("clips", {}))
        rejected.update(c.get("rejected", {}))
    for clip_id in known:
        rejected.pop(clip_id, None)
    return known, rejected


def committed_files(root: str) -> list[str]:
    """URIs of every committed feature file under ``<root>/features``."""
    fdir = layout.features_dir(root)
    return [storage.join(fdir, rel) for c in read_commits(fdir) for rel in c["files"]]


def drop_clips(fdir: str, files: list[str], clip_ids: set[str], tag: str) -> list[str]:
    """``files`` (relative to ``fdir``, not yet committed) without the rows of ``clip_ids``: a
    file that holds some is rewritten under a new name (``<tag>-d<n>-...``) and the old one
    removed; one left empty is removed. Returns the new file list."""
    import pyarrow.parquet as pq

    drop = pa.array(sorted(clip_ids), pa.string())
    out = []
    for n, rel in enumerate(files):
        uri = storage.join(fdir, rel)
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        keep = table.filter(pc.invert(pc.is_in(table.column("clip_id"), drop)))
        if keep.num_rows == table.num_rows:
            out.append(rel)
            continue
        if keep.num_rows:
            new = posixpath.join(posixpath.dirname(rel), f"{tag}-d{n}-{posixpath.basename(rel)}")
            storage.write_table(storage.join(fdir, new), keep, **FEATURE_WRITE_OPTIONS)
            out.append(new)
        storage.remove(uri)
    return out


def _combine_stats(commits: list[dict]) -> dict:
    per: dict[str, list] = {}
    for c in commits:
        for mt, s in c.get("stats", {}).items():
            acc = per.setdefault(mt, [0, 0.0, 0.0])
            acc[0] += s["count"]
            acc[1] = acc[1] + np.asarray(s["sum"])
            acc[2] = acc[2] + np.asarray(s["sumsq"])

    def finish(n, s, ss):
        mean = s / max(n, 1)
        std = np.sqrt(np.maximum(ss / max(n, 1) - mean**2, 1e-12))
        return {"frames": int(n), "mean": mean.tolist(), "std": std.tolist()}

    out = {"per_type": {mt: finish(*v) for mt, v in sorted(per.items())}}
    if per:
        out["all"] = finish(sum(v[0] for v in per.values()), sum(v[1] for v in per.values()),
                            sum(v[2] for v in per.values()))
    return out


def partitioning():
    import pyarrow.dataset as pds

    return pds.partitioning(pa.schema([(c, pa.string()) for c in PARTITION_COLS]), flavor="hive")


def read_features_table(root: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    """Committed features as one Arrow table (small corpora, tests, drivers)."""
    import pyarrow.dataset as pds

    files = committed_files(root)
    if not files:
        return FEATURE_SCHEMA.empty_table().select(columns) if columns else FEATURE_SCHEMA.empty_table()
    afs, base = storage.arrow_filesystem(layout.features_dir(root))
    paths = [storage.arrow_filesystem(f)[1] for f in files]
    dset = pds.dataset(paths, filesystem=afs, format="parquet", partitioning=partitioning(), partition_base_dir=base)
    missing = [f for f in FEATURE_SCHEMA if f.name not in dset.schema.names]
    if missing:  # the first file was written before these columns existed: they read as null
        schema = pa.schema(list(dset.schema) + missing)
        dset = pds.dataset(paths, schema=schema, filesystem=afs, format="parquet", partitioning=partitioning(),
                           partition_base_dir=base)
    table = dset.to_table(columns=columns, filter=filter)
    return table.sort_by("clip_id") if "clip_id" in table.column_names else table


def duration_medians(root: str) -> dict[str, float]:
    """The median clip length (seconds) of each machine type among the committed features of ``root``
    (a type's usual length, for the ``short`` sensor check)."""
    t = read_features_table(root, columns=["machine_type", "duration_s"])
    out: dict[str, list[float]] = {}
    for mt, d in zip(t.column("machine_type").to_pylist(), t.column("duration_s").to_pylist()):
        if d is not None:
            out.setdefault(mt, []).append(float(d))
    return {mt: float(np.median(v)) for mt, v in sorted(out.items())}


def fault_counts(table) -> dict[str, int]:
    """Clips per sensor fault of a feature (or scores) table with a ``faults`` column (or of a list
    of such values), and under ``"clips"`` the clips with any fault."""
    if isinstance(table, pa.Table):
        table = table.column("faults").to_pylist() if "faults" in table.column_names else []
    out: dict[str, int] = {}
    faulty = 0
    for faults in table:
        if faults:
            faulty += 1
            for f in faults:
                out[f] = out.get(f, 0) + 1
    return {"clips": faulty, **dict(sorted(out.items()))}


def read_features_ray(root: str, columns: list[str] | None = None):
    """Committed features as a Ray Dataset (streaming; for training and embedding)."""
    import ray.data
    from ray.data.datasource import Partitioning

    files = committed_files(root)
    if not files:
        raise FileNotFoundError(f"no committed features under {layout.features_dir(root)!r}; run featurize first")
    afs, base = storage.arrow_filesystem(layout.features_dir(root))
    paths = [storage.arrow_filesystem(f)[1] for f in files]
    ds = ray.data.read_parquet(
        paths,
        filesystem=afs,
        partitioning=Partitioning("hive", base_dir=base, field_types={c: str for c in PARTITION_COLS}),
    )
    return ds.select_columns(columns) if columns else ds


def load_stats(root: str) -> dict:
    """Normalisation statistics of the committed training normals, combined from the commits
    (so always those of the rows a reader sees): {"all": {"mean", "std", "frames"},
    "per_type": {...}}."""
    return _combine_stats(read_commits(layout.features_dir(root)))


# --------------------------------------------------------------------------------------
# the write side: committing a run's files, dead runs' leftovers, feature views
# --------------------------------------------------------------------------------------

ALIVE = "_alive"  # a running writer's heartbeat file in its staging folder
VIEW_RUN_ID = "view"


def write_feature_view(source_root: str, view_root: str, clip_ids, *, split: str | None = "train",
                       note: str = "") -> dict:
    """Commit the rows of ``clip_ids`` (committed features of ``source_root``) as the features of
    ``view_root``, in the featurize layout, so every reader of committed features (Ray Train's
    :func:`asd.training.fit.fit`, :func:`asd.stages.embed.embed`) reads exactly that subset.

    ``split`` (default ``"train"``) overwrites the rows' ``split`` column: a view is usually a
    training set (e.g. one machine type's training clips, or a training split formed from normal
    test clips), and training stages select ``split == "train"``; ``None`` keeps the stored split.
    The view is rebuilt whole (its old features are removed first); its commit record is written
    last, so readers see no view or the whole view. Normalisation statistics are recomputed over the
    view's rows. Returns the commit record. Raises ``ValueError`` for an empty selection or clip ids
    without committed features.
    """
    ids = sorted({str(c) for c in clip_ids})
    if not ids:
        raise ValueError(f"empty feature view {view_root!r}: no clip ids given")
    wanted = pa.array(ids, pa.string())
    keys = read_features_table(source_root, columns=["clip_id", "machine_type", "section"],
                               filter=pc.field("clip_id").isin(wanted))
    found = set(keys.column("clip_id").to_pylist())
    missing = [c for c in ids if c not in found]
    if missing:
        raise ValueError(f"{len(missing)} clip(s) have no committed features under {layout.features_dir(source_root)!r}, "
                         f"e.g. {missing[:3]}")
    fdir = layout.features_dir(view_root)
    storage.remove(fdir)
    files: list[str] = []
    stats: dict = {}  # machine type -> partial sums, over every row of the view
    clips: dict[str, str] = {}
    counts: dict[str, int] = {}
    n_rows = 0
    # one (machine type, section) partition at a time: the driver never holds more than one
    for mt, sec in sorted(set(zip(keys.column("machine_type").to_pylist(), keys.column("section").to_pylist()))):
        part = read_features_table(source_root, filter=(pc.field("machine_type") == mt) & (pc.field("section") == sec)
                                   & pc.field("clip_id").isin(wanted))
        if split is not None:
            part = part.set_column(part.schema.get_field_index("split"), "split",
                                   pa.array([split] * part.num_rows, pa.string()))
        rel = f"machine_type={mt}/section={sec}/{VIEW_RUN_ID}.parquet"
        storage.write_table(storage.join(fdir, rel), part.drop_columns(PARTITION_COLS), **FEATURE_WRITE_OPTIONS)
        files.append(rel)
        n_rows += part.num_rows
        clips.update(zip(part.column("clip_id").to_pylist(), part.column("content_sha256").to_pylist()))
        for k, v in clip_counts(part).items():
            counts[k] = counts.get(k, 0) + v
        add_partial_stats(stats, part)
    commit = {
        "run_id": VIEW_RUN_ID,
        "view_of": source_root,
        "note": note,
        "files": files,
        "rows": n_rows,
        "clips": clips,
        "rejected": {},
        "counts": counts,
        "rejects": {},
        "stats": stats_record(stats),
        "config_hash": sorted({c.get("config_hash") for c in read_commits(layout.features_dir(source_root))} - {None}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    feature_log(fdir).append(lambda entries: commit)
    return commit


def vacuum(fdir: str, keep: set[str], after_s: float) -> None:
    """Remove what dead runs left: staging folders whose heartbeat stopped more than ``after_s``
    ago, and data files no commit names that belong to no live run (a live run's files, moved into
    place a moment before its commit, are left alone)."""
    fs, base = storage.filesystem(fdir)
    if not fs.exists(base):
        return
    live = set()
    stage_root = storage.join(fdir, "_staging")
    sfs, spath = storage.filesystem(stage_root)
    if sfs.exists(spath):
        for run in sfs.ls(spath, detail=False):
            run_id = run.rstrip("/").rsplit("/", 1)[-1]
            # the heartbeat, or anything else the run wrote (a run that is starting has a folder
            # before its first heartbeat lands)
            if _quiet_for(storage.join(stage_root, run_id)) < after_s:
                live.add(run_id)
            else:
                log.warning("removing the staging folder of run %s (nothing written for %.0f s)", run_id, after_s)
                storage.remove(storage.join(stage_root, run_id))
    for path in fs.find(base):
        rel = posixpath.relpath(path.replace("\\", "/"), base.replace("\\", "/"))
        if not rel.startswith("machine_type=") or not rel.endswith(".parquet") or rel in keep:
            continue
        name = posixpath.basename(rel)
        if any(name.startswith(r + "-") for r in live):
            continue
        if storage.age_seconds(storage.join(fdir, rel)) >= after_s:
            log.warning("removing uncommitted feature file %s (left by an interrupted run)", rel)
            fs.rm(path)


def _quiet_for(folder: str) -> float:
    """Seconds since anything under ``folder`` was last written (its heartbeat ``ALIVE`` is
    rewritten every 30 s while its run lives); an empty local folder counts from its own time."""
    fs, path = storage.filesystem(folder)
    try:
        ages = [storage.age_seconds(storage.to_uri(fs, p)) for p in fs.find(path)]
        return min(ages) if ages else storage.age_seconds(folder)
    except FileNotFoundError:  # its run finished and removed it meanwhile
        return 0.0


def commit_run(fdir: str, staging: str, files: list[str], problems: list[dict], run_id: str, start_seq: int,
               config_hash: str, compute_stats: bool = True) -> tuple[dict | None, int]:
    """Move this run's staged files into the store (named ``<run_id>-...``: invisible until a
    commit names them) and add one commit to the store's log. When a concurrent run committed
    some of the same clips first, their rows are dropped from this run's files (rewritten) and
    its commit names only the rest, so every clip key is in the store once. Returns the commit
    (with ``seq`` and ``quarantine``; None when nothing was left to add) and how many of this
    run's clips a concurrent run committed first."""
    moved = []
    for rel in files:
        dst_rel = posixpath.join(posixpath.dirname(rel), f"{run_id}-{posixpath.basename(rel)}")
        fs, src_path = storage.filesystem(storage.join(staging, rel))
        fs.mv(src_path, storage.ensure_parent(storage.join(fdir, dst_rel))[1])
        moved.append(dst_rel)
    keys = files_table(fdir, moved, ["clip_id", "content_sha256", "machine_type", "split", "domain", "label", "faults"])
    state = {"files": moved, "keys": keys, "problems": problems, "stats": None, "lost": set()}

    def make(entries: list[tuple[int, dict]]) -> dict | None:
        taken_clips, taken_rejects = committed_keys([e for seq, e in entries if seq > start_seq])
        taken = set(taken_clips) | set(taken_rejects)
        ids = state["keys"].column("clip_id").to_pylist()
        lost = taken.intersection(ids)
        if lost or state["stats"] is None:
            if lost:  # a concurrent run committed these clips first
                state["files"] = drop_clips(fdir, state["files"], lost, run_id)
                state["keys"] = state["keys"].filter(pc.invert(pc.is_in(state["keys"].column("clip_id"),
                                                                         pa.array(sorted(lost), pa.string()))))
                state["lost"] |= lost
            state["stats"] = run_stats(fdir, state["files"]) if compute_stats else {}
        lost_problems = {p["clip_id"] for p in state["problems"] if p["clip_id"] in taken}
        state["lost"] |= lost_problems
        state["problems"] = [p for p in state["problems"] if p["clip_id"] not in taken]
        if not state["files"] and not state["problems"]:
            return None
        keys, problems = state["keys"], state["problems"]
        quarantine = None
        if problems:
            quarantine = storage.join(fdir, "_quarantine", f"{run_id}.parquet")
            storage.write_table(quarantine, pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA))
        return {
            "run_id": run_id,
            "files": state["files"],
            "rows": keys.num_rows,
            "clips": dict(zip(keys.column("clip_id").to_pylist(), keys.column("content_sha256").to_pylist())),
            "rejected": {p["clip_id"]: p.get("content_sha256") for p in problems},
            "counts": clip_counts(keys),
            "rejects": reason_counts(problems),
            "faults": fault_counts(keys),
            "stats": state["stats"],
            "config_hash": config_hash,
            "quarantine": quarantine,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    got = feature_log(fdir).append(make)
    if got is None:  # concurrent runs committed every clip of this one
        for rel in state["files"]:
            storage.remove(storage.join(fdir, rel))
        return None, len(state["lost"])
    seq, commit = got
    return {**commit, "seq": seq}, len(state["lost"])


class Heartbeat:
    """Rewrites ``uri`` every ``every_s`` seconds while the block runs (a run is alive)."""

    def __init__(self, uri: str, every_s: float = 30.0):
        import threading

        self.uri, self.every_s = uri, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="featurize-heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                storage.atomic_write_text(self.uri, f"{time.time()}\n")
            except Exception as exc:  # a missed beat only shortens what vacuum waits for
                log.warning("heartbeat %s: %s", self.uri, exc)

    def __enter__(self):
        storage.atomic_write_text(self.uri, f"{time.time()}\n")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def staged_files(staging: str) -> list[str]:
    fs, base = storage.filesystem(staging)
    if not fs.exists(base):
        return []
    rels = []
    for path in fs.find(base):
        rel = posixpath.relpath(path.replace("\\", "/"), base.replace("\\", "/"))
        if rel.endswith(".parquet") and not rel.startswith("_"):
            rels.append(rel)
    return sorted(rels)


def files_table(staging: str, files: list[str], columns: list[str]) -> pa.Table:
    import pyarrow.dataset as pds

    if not files:
        return FEATURE_SCHEMA.empty_table().select(columns)
    afs, base = storage.arrow_filesystem(staging)
    paths = [storage.arrow_filesystem(storage.join(staging, f))[1] for f in files]
    return pds.dataset(paths, filesystem=afs, format="parquet", partitioning=partitioning(),
                       partition_base_dir=base).to_table(columns=columns)


def clip_counts(table: pa.Table) -> dict[str, int]:
    """Clip counts keyed by ``machine_type/split/domain/label``."""
    out: dict[str, int] = {}
    for r in table.select(["machine_type", "split", "domain", "label"]).to_pylist():
        key = "/".join(str(r[k]) for k in ("machine_type", "split", "domain", "label"))
        out[key] = out.get(key, 0) + 1
    return out


def reason_counts(problems: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in problems:
        out[p["reason"]] = out.get(p["reason"], 0) + 1
    return out


def add_partial_stats(acc: dict, table: pa.Table) -> dict:
    """Add the per machine type partial sums (frames, sum and sum of squares per bin) of
    ``table``'s rows to ``acc`` (machine type -> [frames, sum, sumsq]), a few numpy sums per
    machine type (the per-bin lists are read as one flat buffer, not row by row)."""
    if not table.num_rows:
        return acc
    types = np.asarray(table.column("machine_type").to_pylist(), dtype=object)
    frames = table.column("fbank_frames").to_numpy()
    per_bin = {}
    for name in ("fbank_sum", "fbank_sumsq"):
        col = table.column(name).combine_chunks()
        per_bin[name] = col.flatten().to_numpy().reshape(len(col), -1)
    for mt in sorted(set(types.tolist())):
        rows = types == mt
        a = acc.setdefault(mt, [0, 0.0, 0.0])
        a[0] += int(frames[rows].sum())
        a[1] = a[1] + per_bin["fbank_sum"][rows].sum(axis=0)
        a[2] = a[2] + per_bin["fbank_sumsq"][rows].sum(axis=0)
    return acc


def stats_record(acc: dict) -> dict:
    """The partial sums as a commit record's JSON ``stats``."""
    return {k: {"count": int(v[0]), "sum": np.asarray(v[1]).tolist(), "sumsq": np.asarray(v[2]).tolist()}
            for k, v in acc.items()}


def run_stats(staging: str, files: list[str]) -> dict:
    """Per machine type partial sums (frames, sum, sum of squares per bin) of this run's train normals."""
    t = files_table(staging, files, ["machine_type", "split", "label", "fbank_frames", "fbank_sum", "fbank_sumsq"])
    normal = pc.and_(pc.equal(t.column("split"), "train"),
                     pc.fill_null(pc.equal(t.column("label"), "normal"), True))  # unlabelled train clips count as normal
    return stats_record(add_partial_stats({}, t.filter(normal)))
