"""Featurization with Ray Data: an audio corpus (local or ``s3://``) to log-mel Parquet.

Pipeline, streaming end to end::

    manifest (names only, driver)  ->  blocks of ~rows_per_block clips
      -> map_batches(featurize_batch)   read bytes, sha256, skip known, decode (soundfile),
                                        resample/downmix, Kaldi fbank (torchaudio)
      -> write_parquet(partition_cols=[machine_type, section])  into a staging folder
      -> commit: move files into place, create the next entry of _log/ (put-if-absent)

Layout under ``<root>/features/`` (see docs/design.md)::

    machine_type=<t>/section=<ss>/<run_id>-<file>.parquet   feature rows (committed files only count)
    _log/<seq>.json                                the files, clip keys, rejects and stats sums of one run
    _quarantine/<run_id>.parquet                   rejected inputs: path, clip_id, reason, error
    _SUMMARY.json                                  counts, rejects, throughput, config hash (as the last run saw them)
    _staging/<run_id>/{data,quarantine,attempts,_alive}   a run in progress (never read)

Readers use :func:`asd.features.committed_files`, so a crashed or running job is invisible. A
rerun hashes every input and featurizes only clips whose ``(clip_id,
content_sha256)`` is not already committed (features or quarantine), so reruns
write nothing and new files are added exactly once, also when runs overlap (the loser of a
race for the next log entry drops the clips the winner committed; :mod:`asd.features`). A clip whose bytes changed
under the same ``clip_id`` is quarantined as ``content_changed`` (DCASE corpora
are immutable; a changed clip needs a new run root).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd import SAMPLE_RATE, layout, storage
from asd.data import audio
from asd.data.manifest import PROBLEM_SCHEMA, build_manifest
from asd.features import (
    FEATURE_SCHEMA,
    FEATURE_WRITE_OPTIONS,
    PARTITION_COLS,
    committed_keys,
    drop_clips,
    feature_log,
    partitioning,
    read_commits,
    read_features_table,
)

log = logging.getLogger(__name__)

CONTENT_CHANGED = "content_changed"
ALIVE = "_alive"  # a running featurize's heartbeat file in its staging folder
WORKER_DIED = "worker_died"  # quarantine reason: the clip killed its worker process, repeatedly


@dataclass
class FbankConfig:
    """Kaldi-compatible log-mel filterbank, the input BEATs/EAT-style encoders expect."""

    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    sample_rate: int = SAMPLE_RATE
    dither: float = 0.0
    dtype: str = "float16"  # storage dtype: float16 or float32


@dataclass
class ModulationConfig:
    """The modulation spectrum of a clip: how fast the energy of each frequency band fluctuates.

    Machine faults often show as periodic fluctuation rather than as a new spectral peak:
    bearing defect impulses at BPFO/BPFI (tens to hundreds of Hz), a cracked gear tooth once per
    revolution, valve timing, imbalance at the shaft rate. A 10 ms log-mel frame rate sees
    fluctuation up to 50 Hz only and averages faster ones away; this front end keeps them.

    Per clip: power STFT (``win`` samples, Hann, ``hop`` samples: 2 ms at 16 kHz, a 500 Hz
    envelope rate), ``bands`` log-spaced bands from ``fmin_hz`` to ``fmax_hz`` (FFT bins weighted
    by their overlap with a band, so narrow low bands are never empty), the log energy envelope
    of each band with its mean removed and a Hann taper, ``|rfft|`` of it, averaged into ``bins``
    equal bins over (0, ``max_hz``], log. Stored as a ``(bins, bands)`` matrix (columns ``mod``,
    ``mod_bins``, ``mod_bands``, ``mod_dtype``), 8 KiB a clip at the defaults, whatever the clip
    length: the input of :mod:`asd.models.modnet`.
    """

    enabled: bool = True
    bands: int = 16
    fmin_hz: float = 100.0
    fmax_hz: float = 7900.0
    win: int = 128
    hop: int = 32
    bins: int = 256  # modulation bins over (0, max_hz]; a multiple of 16 (training takes it whole)
    max_hz: float = 250.0  # at most half the envelope rate (sample_rate / hop / 2)
    dtype: str = "float16"

    def check(self, sample_rate: int) -> None:
        if self.bands < 1 or self.bins < 16 or self.bins % 16 or self.win < 8 or self.hop < 1:
            raise ValueError(f"modulation: bands >= 1, bins a multiple of 16, win >= 8, hop >= 1 (got {self})")
        if not 0 < self.fmin_hz < self.fmax_hz <= sample_rate / 2:
            raise ValueError(f"modulation: need 0 < fmin_hz < fmax_hz <= {sample_rate / 2} (got {self})")
        if not 0 < self.max_hz <= sample_rate / self.hop / 2:
            raise ValueError(f"modulation: max_hz must be in (0, {sample_rate / self.hop / 2}] (half the envelope "
                             f"rate at hop {self.hop}), got {self.max_hz}")


@dataclass
class FeaturizeConfig:
    fbank: FbankConfig = field(default_factory=FbankConfig)
    modulation: ModulationConfig = field(default_factory=ModulationConfig)
    min_duration_s: float = 0.5
    batch_size: int = 64  # clips per map_batches call (benchmarks/featurize.py measured 8-64)
    # clips per input block (one featurize task) at most; blocks shrink toward the end of a run,
    # to batch_size (see block_sizes). benchmarks/featurize.py: 128-512 alike
    rows_per_block: int = 512
    num_cpus: float = 1.0  # per featurize task; fractions let it share small machines
    compute_stats: bool = True
    progress: bool = True
    # A task whose worker process dies (a decoder crash, an out-of-memory kill, a lost node) is run
    # again by Ray Data; a clip that was being decoded when its worker died this many times is
    # quarantined (reason ``worker_died``) instead of killing every retry.
    deaths_to_quarantine: int = 2
    # uncommitted files and staging folders of a run whose heartbeat stopped this long ago are a dead
    # run's leftovers (a live run rewrites its heartbeat every 30 s)
    vacuum_after_s: float = 3600.0
    # fault injection for tests: the first task to see this marker missing creates it and kills its worker
    kill_worker_once_marker: str | None = None
    # fault injection for tests: the worker dies whenever it decodes the clip with this id
    kill_worker_on_clip: str | None = None

    def config_hash(self) -> str:
        front = asdict(self.fbank)
        if self.modulation.enabled:  # without it, the hash of log-mel-only roots made before it existed
            front["modulation"] = asdict(self.modulation)
        return hashlib.sha256(json.dumps(front, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class FeaturizeResult:
    features: str
    run_id: str | None
    n_listed: int
    n_already_done: int
    n_featurized: int
    n_quarantined: int
    seconds: float
    clips_per_s: float
    summary_uri: str
    commit_seq: int | None  # this run's entry in features/_log (None: it added nothing)
    quarantine_uri: str | None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------
# per-clip work (runs inside Ray tasks)
# --------------------------------------------------------------------------------------


def compute_fbank(wave: np.ndarray, cfg: FbankConfig) -> np.ndarray:
    """(frames, num_mel_bins) float32 log-mel filterbank of a mono waveform in [-1, 1]."""
    import torch
    import torchaudio.compliance.kaldi as kaldi

    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None] * 32768.0
    fb = kaldi.fbank(
        x,
        num_mel_bins=cfg.num_mel_bins,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
        sample_frequency=cfg.sample_rate,
        dither=cfg.dither,
        htk_compat=True,
        window_type="hanning",
        use_energy=False,
    )
    return fb.numpy()


def _overlap_weights(lo: np.ndarray, hi: np.ndarray, centres: np.ndarray, width: float) -> np.ndarray:
    """(len(lo), len(centres)) share of each interval [lo, hi) covered by the cells
    [centre - width / 2, centre + width / 2), divided by the interval's width (averaging weights)."""
    a = np.maximum(lo[:, None], centres[None, :] - width / 2)
    b = np.minimum(hi[:, None], centres[None, :] + width / 2)
    return np.clip(b - a, 0.0, None) / (hi - lo)[:, None]


def compute_modulation(wave: np.ndarray, sample_rate: int, cfg: ModulationConfig) -> np.ndarray:
    """(cfg.bins, cfg.bands) float32 log modulation spectrum of a mono waveform (see :class:`ModulationConfig`)."""
    x = np.asarray(wave, np.float64)
    if x.shape[0] < cfg.win:
        x = np.pad(x, (0, cfg.win - x.shape[0]))
    n_frames = 1 + (x.shape[0] - cfg.win) // cfg.hop
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.win)[:: cfg.hop][:n_frames]
    power = np.abs(np.fft.rfft(frames * np.hanning(cfg.win), axis=1)) ** 2  # (n_frames, win/2 + 1)
    edges = np.geomspace(cfg.fmin_hz, cfg.fmax_hz, cfg.bands + 1)
    fft_hz = np.arange(power.shape[1]) * sample_rate / cfg.win
    band_w = _overlap_weights(edges[:-1], edges[1:], fft_hz, sample_rate / cfg.win)  # (bands, fft bins)
    env = np.log(power @ band_w.T + 1e-10)  # (n_frames, bands)
    env = (env - env.mean(axis=0)) * np.hanning(n_frames)[:, None]
    spec = np.abs(np.fft.rfft(env, axis=0))  # (n_frames // 2 + 1, bands)
    rate = sample_rate / cfg.hop
    spec[0] = 0.0  # the envelope's mean (removed above) is no modulation
    means = _interval_means(spec, rate / n_frames, np.linspace(0.0, cfg.max_hz, cfg.bins + 1))
    return np.log(means + 1e-6).astype(np.float32)


def _interval_means(values: np.ndarray, width: float, edges: np.ndarray) -> np.ndarray:
    """Means of a piecewise-constant function over [edges[k], edges[k + 1]): ``values[j]`` holds on
    the cell [(j - 1/2) width, (j + 1/2) width); beyond the last cell it is 0. (len(edges) - 1, B)."""
    n = values.shape[0]
    cum = np.concatenate([np.zeros((1,) + values.shape[1:]), np.cumsum(values, axis=0)]) * width
    pos = np.clip(edges / width + 0.5, 0.0, float(n))
    i = np.minimum(np.floor(pos).astype(int), n - 1)
    at = cum[i] + (pos - i)[:, None] * (cum[i + 1] - cum[i])
    return (at[1:] - at[:-1]) / np.diff(edges)[:, None]


def _quarantine_part(problems: list[dict], folder: str) -> None:
    """Side output of a task: its rejects, under a name fixed by content (retries overwrite)."""
    if not problems:
        return
    key = hashlib.sha256("\n".join(sorted(p["path"] for p in problems)).encode()).hexdigest()[:24]
    storage.write_table(storage.join(folder, f"{key}.parquet"), pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA))


def featurize_batch(
    batch: pa.Table,
    cfg: FeaturizeConfig,
    known: dict[str, str],
    quarantine_dir: str,
    run_id: str,
    rejected: dict[str, str | None] | None = None,
    attempts_dir: str | None = None,
) -> pa.Table:
    """Read, hash, check, decode and featurize one batch of manifest rows.

    ``known`` maps clip_id -> content_sha256 of committed features: the same bytes
    are skipped, changed bytes quarantined as ``content_changed``. ``rejected``
    maps clip_id -> sha256 of clips quarantined before: the same bytes are skipped,
    new bytes get a new try. Rejects are written to ``quarantine_dir`` by this
    task; only good rows are returned.

    ``attempts_dir`` (the run's staging): a batch marks that it started; when the mark is already
    there, an earlier attempt's worker died, and this attempt marks each clip before decoding it
    and unmarks it after, so a clip left marked ``deaths_to_quarantine`` times is quarantined as
    ``worker_died`` (the first attempt pays one small write per batch, retries one per clip).
    """
    rejected = rejected or {}
    if cfg.kill_worker_once_marker and not storage.exists(cfg.kill_worker_once_marker):
        storage.atomic_write_text(cfg.kill_worker_once_marker, "killed\n")
        os._exit(1)  # the worker process dies mid-task, as on a lost node or an OOM kill
    ids = batch.column("clip_id").to_pylist()
    marks = storage.join(attempts_dir, hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20]) if attempts_dir else None
    careful = marks is not None and storage.exists(storage.join(marks, "started"))
    if marks is not None and not careful:
        storage.atomic_write_text(storage.join(marks, "started"), "")
    import torch

    torch.set_num_threads(1)
    problems: list[dict] = []
    keep: list[int] = []  # rows of ``batch`` that became features
    computed: dict[str, list] = {k: [] for k in ("sample_rate", "channels", "num_frames", "duration_s",
                                                 "content_sha256", "warnings", "fbank_frames", "fbank",
                                                 "mod_bands", "mod_bins", "mod_dtype", "mod")}
    mcfg = cfg.modulation
    sums, sumsqs = [], []
    bins = cfg.fbank.num_mel_bins
    paths, warns = (batch.column(c).to_pylist() for c in ("path", "warnings"))
    mark = None  # the clip being featurized, on a careful attempt
    for i, (clip_id, path) in enumerate(zip(ids, paths)):
        if mark is not None:  # the clip before this one finished
            storage.remove(mark)
            mark = None
        if careful:  # an earlier attempt of this batch died: which clip was it on?
            deaths = 0
            while storage.exists(storage.join(marks, f"{i}.{deaths}")):
                deaths += 1
            if deaths >= cfg.deaths_to_quarantine:
                problems.append(dict(path=path, clip_id=clip_id, reason=WORKER_DIED, stage="featurize",
                                     error=f"the worker process died {deaths} times while featurizing this clip "
                                           "(a decoder crash or an out-of-memory kill); not retried"))
                continue
            mark = storage.join(marks, f"{i}.{deaths}")
            storage.atomic_write_text(mark, "")
        if cfg.kill_worker_on_clip == clip_id:
            os._exit(1)  # fault injection: this clip kills its worker, every time
        try:
            data = storage.read_bytes(path)
        except Exception as exc:
            problems.append(dict(path=path, clip_id=clip_id, reason="unreadable",
                                 error=f"{type(exc).__name__}: {exc}", stage="featurize"))
            continue
        sha = audio.sha256(data)
        if known.get(clip_id) == sha or rejected.get(clip_id) == sha:
            continue  # already featurized, or already quarantined with these very bytes
        if clip_id in known:
            problems.append(dict(path=path, clip_id=clip_id, reason=CONTENT_CHANGED, stage="featurize", content_sha256=sha,
                                 error=f"content changed since it was featurized (sha256 {known[clip_id][:12]} -> {sha[:12]}); "
                                       "featurize changed clips into a new output root"))
            continue
        try:
            dec = audio.decode(data, target_sr=cfg.fbank.sample_rate, min_duration_s=cfg.min_duration_s)
        except audio.AudioError as exc:
            problems.append(dict(path=path, clip_id=clip_id, reason=exc.reason, error=str(exc), stage="featurize",
                                 content_sha256=sha))
            continue
        fb = compute_fbank(dec.wave, cfg.fbank).astype(cfg.fbank.dtype)
        mod = (compute_modulation(dec.wave, cfg.fbank.sample_rate, mcfg).astype(mcfg.dtype)
               if mcfg.enabled else None)
        seen = fb.astype(np.float32, copy=False)  # statistics of the values readers will see
        sums.append(seen.sum(axis=0, dtype=np.float64))
        sumsqs.append(np.square(seen).sum(axis=0, dtype=np.float64))
        keep.append(i)
        for k, v in (("sample_rate", dec.source.sample_rate), ("channels", dec.source.channels),
                     ("num_frames", dec.source.num_frames), ("duration_s", dec.source.duration_s),
                     ("content_sha256", sha), ("warnings", list(warns[i] or []) + dec.warnings),
                     ("fbank_frames", fb.shape[0]), ("fbank", fb.tobytes()),
                     ("mod_bands", None if mod is None else mod.shape[1]),
                     ("mod_bins", None if mod is None else mod.shape[0]),
                     ("mod_dtype", None if mod is None else mcfg.dtype),
                     ("mod", None if mod is None else mod.tobytes())):
            computed[k].append(v)
    if mark is not None:
        storage.remove(mark)
    _quarantine_part(problems, quarantine_dir)
    return _feature_table(batch.take(pa.array(keep, pa.int64())), computed, sums, sumsqs, bins, cfg.fbank.dtype, run_id)


def _per_bin_list(rows: list[np.ndarray], bins: int) -> pa.Array:
    """``list<float64>`` column of per-bin vectors, built from one flat buffer (no Python floats)."""
    flat = np.concatenate(rows) if rows else np.empty(0, np.float64)
    offsets = pa.array(np.arange(0, (len(rows) + 1) * bins, bins, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat, pa.float64()))


def _feature_table(rows: pa.Table, computed: dict[str, list], sums: list, sumsqs: list, bins: int, dtype: str,
                   run_id: str) -> pa.Table:
    """Feature rows: the manifest columns of ``rows`` with the decoded facts and features set,
    built column by column (a 256 KiB feature per clip, so no per-row Python dicts)."""
    n = rows.num_rows
    cols = {
        **computed,
        "num_mel_bins": [bins] * n,
        "fbank_dtype": [dtype] * n,
        "fbank_sum": _per_bin_list(sums, bins),
        "fbank_sumsq": _per_bin_list(sumsqs, bins),
        "run_id": [run_id] * n,
    }
    arrays = [cols[f.name] if f.name in cols else rows.column(f.name) for f in FEATURE_SCHEMA]
    arrays = [a if isinstance(a, (pa.Array, pa.ChunkedArray)) else pa.array(a, f.type)
              for a, f in zip(arrays, FEATURE_SCHEMA)]
    return pa.Table.from_arrays(arrays, schema=FEATURE_SCHEMA)


# --------------------------------------------------------------------------------------
# reading committed features
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# feature views: a chosen subset of committed rows as a storage root of its own
# --------------------------------------------------------------------------------------

VIEW_RUN_ID = "view"


def write_feature_view(source_root: str, view_root: str, clip_ids, *, split: str | None = "train",
                       note: str = "") -> dict:
    """Commit the rows of ``clip_ids`` (committed features of ``source_root``) as the features of
    ``view_root``, in the featurize layout, so every reader of committed features (Ray Train's
    :func:`asd.train.fit`, :func:`asd.embed.embed`) reads exactly that subset.

    ``split`` (default ``"train"``) overwrites the rows' ``split`` column: a view is usually a
    training set (e.g. one machine type's training clips, or a training split formed from normal
    test clips), and training stages select ``split == "train"``; ``None`` keeps the stored split.
    The view is rebuilt whole (its old features are removed first); its commit record is written
    last, so readers see no view or the whole view. Normalisation statistics are recomputed over the
    view's rows. Returns the commit record. Raises ``ValueError`` for an empty selection or clip ids
    without committed features.
    """
    import pyarrow.compute as pc

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
        for k, v in _counts(part).items():
            counts[k] = counts.get(k, 0) + v
        _add_partial_stats(stats, part)
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
        "stats": _stats_record(stats),
        "config_hash": sorted({c.get("config_hash") for c in read_commits(layout.features_dir(source_root))} - {None}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    feature_log(fdir).append(lambda entries: commit)
    return commit


# --------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------


def _vacuum(fdir: str, keep: set[str], after_s: float) -> None:
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
            alive = storage.join(stage_root, run_id, ALIVE)
            if storage.exists(alive) and storage.age_seconds(alive) < after_s:
                live.add(run_id)
            else:
                log.warning("removing the staging folder of run %s (no heartbeat for %.0f s)", run_id, after_s)
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


def _summary(fdir: str, commits: list[dict], last: dict, cfg: FeaturizeConfig) -> dict:
    counts: dict = {}
    rejects: dict = {}
    for c in commits:
        for key, n in c.get("counts", {}).items():
            counts[key] = counts.get(key, 0) + n
        for reason, n in c.get("rejects", {}).items():
            rejects[reason] = rejects.get(reason, 0) + n
    return {
        "features": fdir,
        "clips": sum(counts.values()),
        "counts": dict(sorted(counts.items())),
        "rejected": dict(sorted(rejects.items())),
        "runs": [c["run_id"] for c in commits],
        "last_run": last,
        "config": {**asdict(cfg.fbank), "modulation": asdict(cfg.modulation)},
        "config_hash": cfg.config_hash(),
    }


def featurize(
    input_uri: str,
    output_root: str,
    cfg: FeaturizeConfig | None = None,
) -> FeaturizeResult:
    """Featurize every new clip under ``input_uri`` into ``<output_root>/features``.

    Fails with :class:`asd.storage.StorageError` before writing anything when the
    input is missing or storage is unreachable. Requires a running Ray (or starts a
    local one).
    """
    import ray

    cfg = cfg or FeaturizeConfig()
    if cfg.modulation.enabled:
        cfg.modulation.check(cfg.fbank.sample_rate)
    t0 = time.perf_counter()
    storage.check_reachable(input_uri)
    storage.check_reachable(output_root, must_exist=False)
    manifest = build_manifest(input_uri, probe=False)
    fdir = layout.features_dir(output_root)
    seen = feature_log(fdir).entries()
    start_seq = seen[-1][0] if seen else -1  # commits after this one are concurrent runs'
    commits = read_commits(fdir, log=False) + [entry for _, entry in seen]
    _vacuum(fdir, {rel for c in commits for rel in c["files"]}, cfg.vacuum_after_s)
    known, rejected = committed_keys(commits)
    storage.write_table(storage.join(output_root, "manifest", "manifest.parquet"), manifest.table)

    listing_problems = [p for p in manifest.problems if p.clip_id not in rejected]
    todo = manifest.table
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    run_dir = storage.join(fdir, "_staging", run_id)
    # side outputs (quarantine parts, attempt markers) live beside the Parquet sink's folder, never inside it
    staging = storage.join(run_dir, "data")
    qdir = storage.join(run_dir, "quarantine")
    attempts = storage.join(run_dir, "attempts")
    files: list[str] = []
    with _Heartbeat(storage.join(run_dir, ALIVE)):  # other runs' vacuum leaves a live run's files alone
        if todo.num_rows:
            if not ray.is_initialized():
                ray.init()
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = cfg.progress
            slots = max(1, int(ray.cluster_resources().get("CPU", 1) / cfg.num_cpus))  # concurrent featurize tasks
            blocks, start = [], 0
            for n in block_sizes(todo.num_rows, slots, cfg.rows_per_block, cfg.batch_size):
                blocks.append(todo.slice(start, n))
                start += n
            known_ref = ray.put((known, rejected))  # once in the object store, not per task
            # The featurize and write operators must carry the same remote args: Ray Data fuses
            # only operators whose args are compatible. Unfused, every feature block (~250 KiB
            # per clip) went through the object store to separate write tasks, which cost a third
            # of the throughput on 2 cores (benchmarks/featurize.py).
            # Ray Data reruns a task whose worker died, without bound; featurize_batch's attempt
            # markers (``attempts``) quarantine the clip that keeps killing its worker, so a poison
            # input ends as a quarantine entry instead of a loop.
            ds = ray.data.from_arrow(blocks).map_batches(
                _featurize_udf,
                fn_kwargs=dict(cfg=cfg, known_ref=known_ref, quarantine_dir=qdir, run_id=run_id, attempts_dir=attempts),
                batch_size=cfg.batch_size,
                batch_format="pyarrow",
                num_cpus=cfg.num_cpus,
            )
            afs, staging_path = storage.arrow_filesystem(staging)
            # Ray deletes a folder it created when no rows were written; on object stores that
            # delete fails (folders are virtual), and they need no folders: don't create one there.
            ds.write_parquet(staging_path, filesystem=afs, partition_cols=PARTITION_COLS,
                             try_create_dir=not storage.is_remote(staging), ray_remote_args={"num_cpus": cfg.num_cpus},
                             row_group_size=cfg.batch_size, **FEATURE_WRITE_OPTIONS)
            files = _staged_files(staging)
        problems = [asdict(p) for p in listing_problems] + _read_staged_quarantine(qdir)
        commit, n_lost = _commit(fdir, staging, files, problems, run_id, cfg, start_seq) if files or problems else (None, 0)
    storage.remove(run_dir)
    commits = read_commits(fdir)
    n_rows = commit["rows"] if commit else 0
    committed_problems = [p for p in problems if commit and p["clip_id"] in commit["rejected"]]
    n_quar = len(committed_problems)
    elapsed = time.perf_counter() - t0
    last = {"run_id": run_id, "featurized": n_rows, "quarantined": n_quar, "lost_race": n_lost,
            "seconds": round(elapsed, 3), "clips_per_s": round(n_rows / elapsed, 3) if elapsed else 0.0}
    summary_uri = storage.atomic_write_json(storage.join(fdir, "_SUMMARY.json"), _summary(fdir, commits, last, cfg))
    for p in committed_problems:
        log.warning("quarantined %s: %s: %s", p["path"], p["reason"], p["error"])
    if n_lost:
        log.warning("%d clip(s) featurized by this run were committed first by a concurrent run; not added again", n_lost)
    log.info("featurized %d clips (%d already done, %d quarantined) into %s in %.1f s",
             n_rows, len(known), n_quar, fdir, elapsed)
    return FeaturizeResult(
        features=fdir,
        run_id=run_id if commit else None,
        n_listed=manifest.table.num_rows + len(manifest.problems),
        n_already_done=len([c for c in manifest.table.column("clip_id").to_pylist() if c in known or c in rejected]) + n_lost,
        n_featurized=n_rows,
        n_quarantined=n_quar,
        seconds=elapsed,
        clips_per_s=last["clips_per_s"],
        summary_uri=summary_uri,
        commit_seq=commit["seq"] if commit else None,
        quarantine_uri=commit.get("quarantine") if commit else None,
    )


def _commit(fdir: str, staging: str, files: list[str], problems: list[dict], run_id: str,
            cfg: FeaturizeConfig, start_seq: int) -> tuple[dict | None, int]:
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
        dst_path = storage.filesystem(storage.join(fdir, dst_rel))[1]
        fs.makedirs(posixpath.dirname(dst_path) if storage.is_remote(fdir) else os.path.dirname(dst_path), exist_ok=True)
        fs.mv(src_path, dst_path)
        moved.append(dst_rel)
    keys = _staged_table(fdir, moved, ["clip_id", "content_sha256", "machine_type", "split", "domain", "label"])
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
            state["stats"] = _run_stats(fdir, state["files"]) if cfg.compute_stats else {}
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
            "counts": _counts(keys),
            "rejects": _reason_counts(problems),
            "stats": state["stats"],
            "config_hash": cfg.config_hash(),
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


class _Heartbeat:
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


def block_sizes(n_rows: int, slots: int, max_rows: int, min_rows: int) -> list[int]:
    """Clips per input block (one featurize task each, in this order) for ``n_rows`` clips on
    ``slots`` concurrent tasks: guided self-scheduling. Each block takes 1/(2 x slots) of the clips
    not yet assigned, at most ``max_rows`` and at least ``min_rows`` (a smaller remainder joins the
    last block: Ray Data would bundle blocks smaller than a batch into one task anyway). Big blocks
    first keep the number of tasks low; small blocks last let every core finish at about the same
    time, where equal blocks leave cores idle for up to a block's time while the slowest finishes
    (cores differ, and the driver's work takes a share of one of them)."""
    max_rows, min_rows = max(1, max_rows), max(1, min(min_rows, max_rows))
    sizes: list[int] = []
    left = n_rows
    while left > 0:
        n = max(min_rows, min(max_rows, -(-left // (2 * max(1, slots)))))
        n = left if left - n < min_rows else n
        sizes.append(n)
        left -= n
    return sizes


# The known-clips map of the current run, fetched once per worker process (by object id), not per
# batch: one entry, a new run's map replaces the last one's.
_WORKER_KNOWN: dict[str, tuple] = {}


def _featurize_udf(batch, cfg, known_ref, quarantine_dir, run_id, attempts_dir=None):
    import ray

    if isinstance(known_ref, tuple):
        known, rejected = known_ref
    else:
        key = known_ref.hex()
        if key not in _WORKER_KNOWN:
            _WORKER_KNOWN.clear()
            _WORKER_KNOWN[key] = ray.get(known_ref)
        known, rejected = _WORKER_KNOWN[key]
    return featurize_batch(batch, cfg, known, quarantine_dir, run_id, rejected, attempts_dir)


def _staged_files(staging: str) -> list[str]:
    fs, base = storage.filesystem(staging)
    if not fs.exists(base):
        return []
    rels = []
    for path in fs.find(base):
        rel = posixpath.relpath(path.replace("\\", "/"), base.replace("\\", "/"))
        if rel.endswith(".parquet") and not rel.startswith("_"):
            rels.append(rel)
    return sorted(rels)


def _staged_table(staging: str, files: list[str], columns: list[str]) -> pa.Table:
    import pyarrow.dataset as pds

    if not files:
        return FEATURE_SCHEMA.empty_table().select(columns)
    afs, base = storage.arrow_filesystem(staging)
    paths = [storage.arrow_filesystem(storage.join(staging, f))[1] for f in files]
    return pds.dataset(paths, filesystem=afs, format="parquet", partitioning=partitioning(),
                       partition_base_dir=base).to_table(columns=columns)


def _counts(table: pa.Table) -> dict[str, int]:
    """Clip counts keyed by ``machine_type/split/domain/label``."""
    out: dict[str, int] = {}
    for r in table.select(["machine_type", "split", "domain", "label"]).to_pylist():
        key = "/".join(str(r[k]) for k in ("machine_type", "split", "domain", "label"))
        out[key] = out.get(key, 0) + 1
    return out


def _reason_counts(problems: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in problems:
        out[p["reason"]] = out.get(p["reason"], 0) + 1
    return out


def _add_partial_stats(acc: dict, table: pa.Table) -> dict:
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


def _stats_record(acc: dict) -> dict:
    """The partial sums as a commit record's JSON ``stats``."""
    return {k: {"count": int(v[0]), "sum": np.asarray(v[1]).tolist(), "sumsq": np.asarray(v[2]).tolist()}
            for k, v in acc.items()}


def _run_stats(staging: str, files: list[str]) -> dict:
    """Per machine type partial sums (frames, sum, sum of squares per bin) of this run's train normals."""
    t = _staged_table(staging, files, ["machine_type", "split", "label", "fbank_frames", "fbank_sum", "fbank_sumsq"])
    normal = pc.and_(pc.equal(t.column("split"), "train"),
                     pc.fill_null(pc.equal(t.column("label"), "normal"), True))  # unlabelled train clips count as normal
    return _stats_record(_add_partial_stats({}, t.filter(normal)))


def _read_staged_quarantine(qdir: str) -> list[dict]:
    fs, path = storage.filesystem(qdir)
    if not fs.exists(path):
        return []
    rows = storage.read_table(qdir).to_pylist()
    return sorted(rows, key=lambda r: r["clip_id"])


__all__ = [
    "FbankConfig",
    "ModulationConfig",
    "compute_modulation",
    "FeaturizeConfig",
    "FeaturizeResult",
    "block_sizes",
    "compute_fbank",
    "featurize",
    "write_feature_view",
]
