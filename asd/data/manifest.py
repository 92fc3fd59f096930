"""Listing a DCASE-layout corpus (local or ``s3://``) into a manifest table.

Layout: ``<root>/.../<machine_type>/{train,test}/<file>.wav`` with optional
``<root>/.../<machine_type>/attributes_<ss>.csv``. The ``clip_id`` of a clip is
its path relative to the root (posix separators), the row key of every later
stage.

:func:`build_manifest` never crashes on a bad file: every clip that cannot be
used gets a :class:`Problem` (path, reason, message) and the listing goes on.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa

from asd import SAMPLE_RATE
from asd.data import audio, dcase
from asd.io import storage

log = logging.getLogger(__name__)

UNKNOWN_NAME = "unknown_name"
UNSUPPORTED_FORMAT = "unsupported_format"
UNKNOWN_LAYOUT = "unknown_layout"
UNREADABLE = "unreadable"
BAD_ATTRIBUTES = "bad_attributes_csv"

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".aiff", ".aif", ".m4a", ".opus")

MANIFEST_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("path", pa.string()),
        ("machine_type", pa.string()),
        ("section", pa.string()),
        ("domain", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("clip_index", pa.int64()),
        ("attributes", pa.map_(pa.string(), pa.string())),
        ("attribute_string", pa.string()),
        ("name_format", pa.string()),
        ("size_bytes", pa.int64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("num_frames", pa.int64()),
        ("duration_s", pa.float64()),
        ("content_sha256", pa.string()),
        ("warnings", pa.list_(pa.string())),
    ]
)

PROBLEM_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("clip_id", pa.string()),
        ("reason", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("content_sha256", pa.string()),
    ]
)


@dataclass
class Problem:
    """One input that could not be used: which file, a short reason code, and the message."""

    path: str
    clip_id: str
    reason: str
    error: str
    stage: str = "listing"
    content_sha256: str | None = None

    def line(self) -> str:
        return f"{self.path}: {self.reason}: {self.error}"


def problems_table(problems: list[Problem]) -> pa.Table:
    return pa.Table.from_pylist([asdict(p) for p in problems], schema=PROBLEM_SCHEMA)


@dataclass
class Manifest:
    table: pa.Table
    problems: list[Problem]
    root: str

    @property
    def problems_table(self) -> pa.Table:
        return problems_table(self.problems)

    def counts(self) -> dict:
        """Clip counts per machine type / split / domain / label."""
        out: dict = {}
        for row in self.table.select(["machine_type", "split", "domain", "label"]).to_pylist():
            key = "/".join(str(row[k]) for k in ("split", "domain", "label"))
            out.setdefault(row["machine_type"], {}).setdefault(key, 0)
            out[row["machine_type"]][key] += 1
        return out


@dataclass
class CorpusFile:
    uri: str
    rel: str
    size: int


def list_files(root: str) -> list[CorpusFile]:
    """Every file under ``root`` (recursively), sorted by relative path.

    Raises :class:`asd.io.storage.StorageError` when the root is missing or unreachable.
    """
    storage.check_reachable(root)
    fs, base = storage.filesystem(root)
    try:
        found = fs.find(base, detail=True)
    except Exception as exc:
        raise storage.StorageError(f"cannot list {root!r}: {type(exc).__name__}: {exc}") from exc
    base = base.rstrip("/")
    files = []
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        rel = posixpath.relpath(path.replace("\\", "/"), base.replace("\\", "/"))
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files, staging and quarantine folders
        files.append(CorpusFile(storage.to_uri(fs, path), rel, int(info.get("size") or 0)))
    files.sort(key=lambda f: f.rel)
    return files


def _attribute_tables(files: list[CorpusFile], problems: list[Problem]) -> dict[tuple[str, str], dict]:
    """(machine directory, section) -> {file name: attributes} from every attributes csv."""
    tables: dict[tuple[str, str], dict] = {}
    for f in files:
        section = dcase.attributes_csv_section(f.rel)
        if section is None:
            continue
        try:
            tables[(posixpath.dirname(f.rel), section)] = dcase.parse_attributes_csv(
                storage.read_text(f.uri)
            )
        except Exception as exc:
            problems.append(Problem(f.uri, f.rel, BAD_ATTRIBUTES, f"{type(exc).__name__}: {exc}"))
    return tables


def _row_from_name(f: CorpusFile, attr_tables: dict) -> dict:
    """Metadata of one clip from its path and name (raises ValueError with a reason attribute)."""
    parts = f.rel.split("/")
    if len(parts) < 3 or parts[-2] not in dcase.SPLITS:
        raise _Reject(UNKNOWN_LAYOUT, "expected <machine_type>/{train,test}/<file>.wav")
    machine_type, dir_split, name = parts[-3], parts[-2], parts[-1]
    try:
        parsed = dcase.parse_name(name)
    except dcase.NameError_ as exc:
        raise _Reject(UNKNOWN_NAME, str(exc)) from exc
    warnings = []
    if parsed.split is not None and parsed.split != dir_split:
        warnings.append(f"name says split {parsed.split!r} but folder is {dir_split!r}; using the folder")
    machine_dir = "/".join(parts[:-2])
    attrs = dict(parsed.attributes)
    listed = attr_tables.get((machine_dir, parsed.section), {}).get(name)
    if listed is not None:
        attrs = listed
    return {
        "clip_id": f.rel,
        "path": f.uri,
        "machine_type": machine_type,
        "section": parsed.section,
        "domain": parsed.domain,
        "split": dir_split,
        "label": parsed.label,
        "clip_index": parsed.clip_index,
        "attributes": list(attrs.items()),
        "attribute_string": parsed.attribute_string,
        "name_format": parsed.name_format,
        "size_bytes": f.size,
        "sample_rate": None,
        "channels": None,
        "num_frames": None,
        "duration_s": None,
        "content_sha256": None,
        "warnings": warnings,
    }


class _Reject(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _probe_row(row: dict, min_duration_s: float, target_sr: int) -> dict:
    """Read the clip, hash it and check its header (raises _Reject)."""
    try:
        data = storage.read_bytes(row["path"])
    except Exception as exc:
        raise _Reject(UNREADABLE, f"{type(exc).__name__}: {exc}") from exc
    try:
        info = audio.probe(data)
    except audio.AudioError as exc:
        raise _Reject(exc.reason, str(exc)) from exc
    if info.num_frames == 0:
        raise _Reject(audio.EMPTY, "WAV has no audio frames")
    if info.duration_s < min_duration_s:
        raise _Reject(audio.TOO_SHORT, f"too short: {info.duration_s:.3f} s < minimum {min_duration_s:.3f} s")
    warnings = list(row["warnings"])
    if info.channels != 1:
        warnings.append(f"{info.channels} channels: will be downmixed to mono")
    if info.sample_rate != target_sr:
        warnings.append(f"{info.sample_rate} Hz: will be resampled to {target_sr} Hz")
    return {
        **row,
        "sample_rate": info.sample_rate,
        "channels": info.channels,
        "num_frames": info.num_frames,
        "duration_s": info.duration_s,
        "content_sha256": audio.sha256(data),
        "warnings": warnings,
    }


def build_manifest(
    root: str,
    probe: bool = True,
    min_duration_s: float = 0.0,
    target_sr: int = SAMPLE_RATE,
    workers: int = 8,
    progress: bool = False,
) -> Manifest:
    """List a corpus and describe every clip.

    ``probe=False`` uses names only (fast; featurization decodes and checks the
    audio itself in Ray tasks). ``probe=True`` also reads each clip to hash it and
    check its header (sample rate, channels, length), in a thread pool.
    Unusable files become :class:`Problem` entries, logged one line each.
    """
    files = list_files(root)
    problems: list[Problem] = []
    attr_tables = _attribute_tables(files, problems)
    rows = []
    for f in files:
        low = f.rel.lower()
        if dcase.attributes_csv_section(f.rel) is not None:
            continue
        parent = f.rel.split("/")[-2] if "/" in f.rel else ""
        if not low.endswith(".wav"):
            if parent in dcase.SPLITS or low.endswith(AUDIO_SUFFIXES):
                problems.append(Problem(f.uri, f.rel, UNSUPPORTED_FORMAT, "only .wav clips are supported"))
            continue  # documentation, csv files etc. beside the clips
        try:
            rows.append(_row_from_name(f, attr_tables))
        except _Reject as exc:
            problems.append(Problem(f.uri, f.rel, exc.reason, str(exc)))
    if probe and rows:
        rows = _probe_all(rows, problems, min_duration_s, target_sr, workers, progress)
    for p in problems:
        log.warning("rejected %s", p.line())
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    return Manifest(table=table, problems=problems, root=root)


def _probe_all(rows, problems, min_duration_s, target_sr, workers, progress):
    def one(row):
        try:
            return _probe_row(row, min_duration_s, target_sr), None
        except _Reject as exc:
            return None, Problem(row["path"], row["clip_id"], exc.reason, str(exc))

    out = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(one, rows)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(rows), desc="probe clips", unit="clip")
        for row, problem in results:
            if problem is not None:
                problems.append(problem)
            else:
                out.append(row)
    return out


def attributes_of(table: pa.Table) -> list[dict[str, str]]:
    """The ``attributes`` map column as a list of dicts."""
    return [dict(a or []) for a in table.column("attributes").to_pylist()]
