"""The feature store: what a featurized row holds and how its committed files are read.

``<root>/features/`` holds Parquet files partitioned by machine type and section
(``machine_type=<t>/section=<s>/<run>.parquet``), normalisation statistics under ``_stats/`` and
one commit record per featurize run under ``_commits/`` listing its files: a file is visible only
once a commit names it, so readers never see half a run. :mod:`asd.featurize` writes it; the
training, embedding and scoring stages read it through this module, which needs neither Ray (its
Ray Dataset reader imports Ray when called) nor an audio decoder.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa

from asd import layout, storage
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




def read_commits(fdir: str) -> list[dict]:
    """The commit records under ``<fdir>/_commits``, oldest first."""
    fs, path = storage.filesystem(storage.join(fdir, "_commits"))
    if not fs.exists(path):
        return []
    out = []
    for p in sorted(fs.glob(posixpath.join(path, "*.json") if "://" in fdir else f"{path}/*.json")):
        with fs.open(p, "rb") as f:
            out.append(json.loads(f.read()))
    return out


def committed_files(root: str) -> list[str]:
    """URIs of every committed feature file under ``<root>/features``."""
    fdir = layout.features_dir(root)
    return [storage.join(fdir, rel) for c in read_commits(fdir) for rel in c["files"]]


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
    """Normalisation statistics: {"all": {"mean": [...], "std": [...]}, "per_type": {...}}."""
    return storage.read_json(storage.join(layout.features_dir(root), "_stats", "stats.json"))
