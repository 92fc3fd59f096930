"""The feature store: what a featurized row holds, its commit log, and how committed files are read.

``<root>/features/`` holds Parquet files partitioned by machine type and section
(``machine_type=<t>/section=<s>/<run>-<part>.parquet``) and a commit log ``_log/<seq>.json``
(:class:`asd.commitlog.CommitLog`): one entry per committing featurize run, naming its files, its
clip keys, its rejects and its partial normalisation sums. A file is visible only once an entry
names it, so readers never see half a run; entries are created put-if-absent in one order, and a
run that finds a concurrent run's entry naming some of its clips drops them first
(:func:`drop_clips`), so every clip key is in the store once whatever runs overlap.
:mod:`asd.featurize` writes it; the training, embedding and scoring stages read it through this
module, which needs neither Ray (its Ray Dataset reader imports Ray when called) nor an audio
decoder. Stores written before the log (``_commits/<run>.json``) are read as they are.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd import layout, storage
from asd.commitlog import CommitLog
from asd.data.manifest import MANIFEST_SCHEMA

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
        pa.field("run_id", pa.string()),
    ]
)


# The feature matrix is raw float16/float32 bytes, a different value for every clip: dictionary
# encoding never pays (Parquet hashes every 256 KiB value before giving up), snappy saves 0.2 % on
# log-mel bytes, and min/max statistics of such values are useless. Left on, they cost about three
# quarters of a feature file's write (benchmarks/featurize.py). Every other column keeps pyarrow's
# defaults. Every writer of feature files uses these options.
RAW_COLUMNS = ("fbank", "mod")
FEATURE_WRITE_OPTIONS = dict(
    use_dictionary=[f.name for f in FEATURE_SCHEMA if f.name not in RAW_COLUMNS],
    write_statistics=[f.name for f in FEATURE_SCHEMA if f.name not in RAW_COLUMNS],
    compression={f.name: "none" if f.name in RAW_COLUMNS else "snappy" for f in FEATURE_SCHEMA},
)


# The matrices a feature row stores: name -> (bytes, dtype, rows, columns) columns.
MATRICES = {
    "fbank": ("fbank", "fbank_dtype", "fbank_frames", "num_mel_bins"),  # log-mel: (frames, mel bins)
    "mod": ("mod", "mod_dtype", "mod_bins", "mod_bands"),  # modulation spectrum: (modulation bins, bands)
}


# the columns that identify a clip and its role, in every store keyed by clip (features, embeddings)
KEY_COLUMNS = ["clip_id", "machine_type", "section", "domain", "split", "label", "content_sha256"]


def matrix_columns(name: str = "fbank") -> list[str]:
    """The feature columns that hold matrix ``name`` (one of :data:`MATRICES`)."""
    try:
        return list(MATRICES[name])
    except KeyError:
        raise ValueError(f"unknown feature matrix {name!r}; known: {sorted(MATRICES)}") from None


def matrix_array(row: dict, name: str = "fbank", as_stored: bool = False) -> np.ndarray:
    """Matrix ``name`` of a feature row as float32 (``as_stored``: in its stored dtype, a view of
    the row's bytes); a row without it raises ValueError naming the clip."""
    data, dtype, rows, cols = MATRICES[name]
    if row.get(data) is None:
        raise ValueError(f"clip {row.get('clip_id', '?')!r} has no {name!r} features (featurized with "
                         f"{'modulation.enabled=false' if name == 'mod' else 'another front end'}); featurize the "
                         "corpus into a fresh root with it enabled")
    arr = np.frombuffer(row[data], dtype=np.dtype(row[dtype])).reshape(int(row[rows]), int(row[cols]))
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




LOG = "_log"  # the store's commit log (asd.commitlog.CommitLog): one entry per committing run
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
    table = dset.to_table(columns=columns, filter=filter)
    return table.sort_by("clip_id") if "clip_id" in table.column_names else table


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
