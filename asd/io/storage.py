"""Storage roots as URIs: local paths and ``s3://`` through one code path.

Every stage reads and writes through :func:`filesystem` (an fsspec filesystem plus a
path inside it), so the same code runs on ``./outputs/run`` and on
``s3://bucket/prefix``. Object-store endpoints come from the standard AWS
environment (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, instance profiles or
IRSA); nothing here takes keys.

Writes are atomic for readers: :func:`atomic_write_bytes` writes to a staging name
and renames (local) or relies on the single-PUT atomicity of an object (S3);
directory-level stages publish a ``_SUCCESS`` marker last (:func:`publish`), and
readers call :func:`is_published` before trusting a directory.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs

SUCCESS = "_SUCCESS"


class StorageError(RuntimeError):
    """Storage that is missing, unreachable or not usable, with the URI in the message."""


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fsspec filesystem, path inside it)`` for a local path or URL."""
    uri = str(uri)
    if not is_remote(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    fs, path = fsspec.core.url_to_fs(uri, **_storage_options(uri))
    return fs, path


def _storage_options(uri: str) -> dict[str, Any]:
    if uri.startswith(("s3://", "s3a://")):
        # s3fs caches listings by default; stages list what other processes just wrote.
        opts: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": False}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The same location as a ``pyarrow.fs.FileSystem`` (for pyarrow and Ray Data I/O)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


SCHEMES = ("s3", "file")  # besides plain local paths


def validate_uri(uri, what: str = "path", allow_parent: bool = False) -> str:
    """A storage location a job may use: a local path, ``file://`` or ``s3://bucket/...``;
    no control characters or other schemes, and (unless ``allow_parent``, for inputs) no
    ``..`` segments. Returns it unchanged."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"{what}: expected a path or URI, got {uri!r}")
    if any(ord(c) < 32 for c in uri):
        raise ValueError(f"{what}: control characters in {uri!r}")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if scheme not in SCHEMES:
            raise ValueError(f"{what}: unsupported scheme {scheme!r} in {uri!r} (use a local path or s3://)")
        if scheme == "s3" and not rest.split("/", 1)[0]:
            raise ValueError(f"{what}: no bucket in {uri!r}")
    else:
        rest = uri
    if not allow_parent and ".." in rest.replace("\\", "/").split("/"):
        raise ValueError(f"{what}: '..' is not allowed in {uri!r}")
    return uri


def is_within(root: str, uri: str) -> bool:
    """Whether ``uri`` is ``root`` or lies under it (same scheme and bucket)."""
    def norm(u: str) -> str:
        if is_remote(u):
            return u.rstrip("/")
        return absolute(u).rstrip("/") or "/"

    r, u = norm(root), norm(uri)
    return u == r or u.startswith(r + "/")


def absolute(uri: str) -> str:
    """``uri`` unchanged when remote, else an absolute local path: for paths handed to Ray
    workers, whose working directory is not the driver's."""
    if is_remote(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path (always with '/')."""
    uri = str(uri).rstrip("/")
    parts = tuple(str(p).strip("/") for p in parts if str(p))
    if not parts:
        return uri
    return posixpath.join(uri, *parts) if is_remote(uri) else os.path.join(uri, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of :func:`filesystem` for a path returned by ``fs.find``/``fs.ls``."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


def check_reachable(uri: str, must_exist: bool = True) -> None:
    """Fail early with a clear message when ``uri`` cannot be reached (or is missing)."""
    try:
        fs, path = filesystem(uri)
        exists = fs.exists(path)
    except Exception as exc:  # network, credentials, unknown protocol ...
        raise StorageError(f"storage {uri!r} is unreachable: {type(exc).__name__}: {exc}") from exc
    if must_exist and not exists:
        raise StorageError(f"input {uri!r} does not exist")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def atomic_write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` so that a reader sees the old content or the whole new one."""
    fs, path = ensure_parent(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)  # one PUT: atomic per object
        return uri
    os.replace(_finished_temp(path, data), path)
    return uri


def ensure_parent(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``filesystem(uri)``, with the folder that will hold ``uri`` made (a no-op on object stores' virtual folders)."""
    fs, path = filesystem(uri)
    fs.makedirs(posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path), exist_ok=True)
    return fs, path


def _finished_temp(path: str, data: bytes) -> str:
    """``data`` written and synced to a hidden temporary file beside the local ``path``."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` unless it exists (put-if-absent); True when this call
    created it. Readers see no file or the whole of it. Local: a hard link of a finished
    temporary file (atomic, refuses an existing name). S3: one ``PutObject`` with
    ``If-None-Match: *`` (S3 answers 412 when the key exists; conditional writes need an S3
    or S3-compatible store that supports them: AWS S3 has since 2024, MinIO and moto do)."""
    fs, path = ensure_parent(uri)
    if is_remote(uri):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    tmp = _finished_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def age_seconds(uri: str) -> float:
    """Seconds since ``uri`` (a file) was last written."""
    import datetime as dt

    fs, path = filesystem(uri)
    modified = fs.modified(path)
    if modified.tzinfo is None:  # local filesystems answer in local time without a zone
        return time.time() - modified.timestamp()
    return (dt.datetime.now(dt.timezone.utc) - modified).total_seconds()


def atomic_write_text(uri: str, text: str) -> str:
    return atomic_write_bytes(uri, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON values: dataclasses as dicts, tuples as lists, numpy scalars as Python
    ones, non-finite floats as None, anything else JSON cannot hold as its ``str``."""
    import dataclasses
    import math

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in (sorted(obj) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return json_safe(obj.item())
    return str(obj)


def atomic_write_json(uri: str, obj: Any) -> str:
    return atomic_write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table(uri: str, table, **options) -> str:
    """Write one Arrow table as a Parquet file, atomically (``options``: ``pyarrow.parquet.write_table``'s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return atomic_write_bytes(uri, sink.getvalue().to_pybytes())


def read_table(uri: str, columns: list[str] | None = None, filters=None):
    """Read a Parquet file or directory (hive partitions not inferred) into an Arrow table."""
    import pyarrow.dataset as ds

    afs, path = arrow_filesystem(uri)
    dataset = ds.dataset(path, filesystem=afs, format="parquet", partitioning=None)
    return dataset.to_table(columns=columns, filter=filters)


def publish(uri: str, info: dict | None = None) -> str:
    """Mark a directory stage complete by writing its ``_SUCCESS`` file last."""
    return atomic_write_json(join(uri, SUCCESS), info or {})


def is_published(uri: str) -> bool:
    return exists(join(uri, SUCCESS))


def remove(uri: str, recursive: bool = True) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def staging_dir(final_uri: str) -> str:
    """A fresh staging location beside ``final_uri`` (hidden from listings by its '_' prefix)."""
    parent, name = final_uri.rstrip("/").rsplit("/", 1) if "/" in final_uri.rstrip("/") else (".", final_uri)
    return join(parent, f"_staging-{name}-{uuid.uuid4().hex[:8]}")


def publish_dir(staging_uri: str, final_uri: str, info: dict | None = None) -> str:
    """Replace the directory ``final_uri`` by the finished ``staging_uri`` (one writer at a time:
    stages publish through :func:`asd.io.commitlog.publish_dir`, which takes turns under a lease).

    Local: ``_SUCCESS`` is written into the staging folder, then the folder is swapped
    in by rename, so readers see the old stage or the whole new one. Object stores
    have no rename: ``final/_SUCCESS`` is removed first, the files are copied, stale
    files deleted, and ``_SUCCESS`` written last; readers require it
    (:func:`require_published`).
    """
    fs, src = filesystem(staging_uri)
    _, dst = filesystem(final_uri)
    if not is_remote(final_uri):
        publish(staging_uri, info)
        old = None
        if os.path.exists(dst):
            old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        if old:
            fs.rm(old, recursive=True)
        return final_uri
    if fs.exists(posixpath.join(dst, SUCCESS)):
        fs.rm(posixpath.join(dst, SUCCESS))
    new = {posixpath.relpath(p, src) for p in fs.find(src)}
    for rel in sorted(new):
        fs.copy(posixpath.join(src, rel), posixpath.join(dst, rel))
    if fs.exists(dst):
        for p in fs.find(dst):
            if posixpath.relpath(p, dst) not in new:
                fs.rm(p)
    fs.rm(src, recursive=True)
    publish(final_uri, info)
    return final_uri


def require_exists(uri: str, hint: str) -> str:
    """Raise FileNotFoundError (with ``hint``: what makes it) unless ``uri`` exists."""
    if not exists(uri):
        raise FileNotFoundError(f"{uri!r} does not exist; {hint}")
    return uri


def require_published(uri: str) -> str:
    """Raise FileNotFoundError unless ``uri`` is a complete, published stage."""
    if not is_published(uri):
        raise FileNotFoundError(f"{uri!r} is not a published stage output (no {SUCCESS}); run the stage that makes it")
    return uri


def collect_tables(ds, schema):
    """Every block of the Ray Dataset ``ds`` as one table of ``schema``.

    Blocks with no rows are dropped first: a filter that leaves a block empty (e.g. a feature file
    holding only training clips, when only test clips are kept) can hand back a table with no
    columns, which ``pa.concat_tables`` refuses next to the real ones."""
    import pyarrow as pa
    import ray

    tables = [t for t in (ray.get(ref) for ref in ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
