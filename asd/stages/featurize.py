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

Readers use :func:`asd.stores.features.committed_files`, so a crashed or running job is invisible. A
rerun hashes every input and featurizes only clips whose ``(clip_id,
content_sha256)`` is not already committed (features or quarantine), so reruns
write nothing and new files are added exactly once, also when runs overlap (the loser of a
race for the next log entry drops the clips the winner committed; :mod:`asd.stores.features`). A clip whose bytes changed
under the same ``clip_id`` is quarantined as ``content_changed`` (DCASE corpora
are immutable; a changed clip needs a new run root).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from asd.data import audio, sensor
from asd.data.frontend import (
    FBANK_KINDS,
    FbankConfig,
    ModulationConfig,
    SpectrumConfig,
    compute_fbank,
    compute_modulation,
    compute_spectrum,
)
from asd.data.manifest import PROBLEM_SCHEMA, build_manifest
from asd.data.sensor import SensorConfig
from asd.io import layout, storage
from asd.stores.features import (
    ALIVE,
    FEATURE_SCHEMA,
    FEATURE_WRITE_OPTIONS,
    PARTITION_COLS,
    SENSOR_COLUMNS,
    Heartbeat,
    commit_run,
    committed_keys,
    duration_medians,
    feature_log,
    read_commits,
    staged_files,
    vacuum,
)

log = logging.getLogger(__name__)

CONTENT_CHANGED = "content_changed"
WORKER_DIED = "worker_died"  # quarantine reason: the clip killed its worker process, repeatedly


@dataclass
class FeaturizeConfig:
    fbank: FbankConfig = field(default_factory=FbankConfig)
    modulation: ModulationConfig = field(default_factory=ModulationConfig)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    # sensor-fault checks of every decoded clip (asd.data.sensor): flagged clips are still featurized
    sensor: SensorConfig = field(default_factory=SensorConfig)
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
        if front["kind"] == "kaldi":  # the hash of roots made before the front end had a kind
            del front["kind"]
        if self.modulation.enabled:  # without it, the hash of log-mel-only roots made before it existed
            front["modulation"] = asdict(self.modulation)
        if self.spectrum.enabled:  # likewise for roots made before the spectrum existed
            front["spectrum"] = asdict(self.spectrum)
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
    usual_s: dict[str, float] | None = None,
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

    Every decoded clip gets the sensor-fault checks of ``cfg.sensor`` (:func:`asd.data.sensor.check`;
    ``usual_s``: each machine type's usual clip length, for the ``short`` check).
    """
    rejected = rejected or {}
    usual_s = usual_s or {}
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
                                                 "mod_bands", "mod_bins", "mod_dtype", "mod",
                                                 "spec_bins", "spec_dtype", "spec", *SENSOR_COLUMNS)}
    mcfg, scfg = cfg.modulation, cfg.spectrum
    sums, sumsqs = [], []
    bins = cfg.fbank.num_mel_bins
    paths, warns, types = (batch.column(c).to_pylist() for c in ("path", "warnings", "machine_type"))
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
        spec = compute_spectrum(dec.wave, cfg.fbank.sample_rate, scfg).astype(scfg.dtype) if scfg.enabled else None
        checked = (sensor.check(dec.mono, dec.source.sample_rate, usual_s.get(types[i]), cfg.sensor)
                   if cfg.sensor.enabled else None)
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
                     ("mod", None if mod is None else mod.tobytes()),
                     ("spec_bins", None if spec is None else spec.shape[0]),
                     ("spec_dtype", None if spec is None else scfg.dtype),
                     ("spec", None if spec is None else spec.tobytes()),
                     ("faults", None if checked is None else checked.faults),
                     ("rms_dbfs", None if checked is None else checked.rms_dbfs),
                     ("clipped_share", None if checked is None else checked.clipped_share),
                     ("zero_run_s", None if checked is None else checked.longest_zero_run_s),
                     ("dc_offset", None if checked is None else checked.dc_offset)):
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



# --------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------


def _summary(fdir: str, commits: list[dict], last: dict, cfg: FeaturizeConfig, usual_s: dict) -> dict:
    counts: dict = {}
    rejects: dict = {}
    faults: dict = {"clips": 0}
    for c in commits:
        for key, n in c.get("counts", {}).items():
            counts[key] = counts.get(key, 0) + n
        for reason, n in c.get("rejects", {}).items():
            rejects[reason] = rejects.get(reason, 0) + n
        for name, n in c.get("faults", {}).items():  # commits from before the checks have none
            faults[name] = faults.get(name, 0) + n
    return {
        "features": fdir,
        "clips": sum(counts.values()),
        "counts": dict(sorted(counts.items())),
        "rejected": dict(sorted(rejects.items())),
        # clips featurized and flagged by the sensor checks ("clips": with any fault; per fault)
        "sensor_faults": faults,
        "usual_duration_s": usual_s,
        "sensor": asdict(cfg.sensor),
        "runs": [c["run_id"] for c in commits],
        "last_run": last,
        "config": {**asdict(cfg.fbank), "modulation": asdict(cfg.modulation), "spectrum": asdict(cfg.spectrum)},
        "config_hash": cfg.config_hash(),
    }


def featurize(
    input_uri: str,
    output_root: str,
    cfg: FeaturizeConfig | None = None,
    reference_root: str | None = None,
) -> FeaturizeResult:
    """Featurize every new clip under ``input_uri`` into ``<output_root>/features``.

    ``reference_root``: another root whose committed features tell each machine type's usual clip
    length (nightly rescoring passes the served root: its training clips); see :func:`usual_lengths`.

    Fails with :class:`asd.io.storage.StorageError` before writing anything when the
    input is missing or storage is unreachable. Requires a running Ray (or starts a
    local one).
    """
    import ray

    cfg = cfg or FeaturizeConfig()
    if cfg.modulation.enabled:
        cfg.modulation.check(cfg.fbank.sample_rate)
    if cfg.spectrum.enabled:
        cfg.spectrum.check(cfg.fbank.sample_rate)
    if cfg.fbank.kind not in FBANK_KINDS:
        raise ValueError(f"featurize.fbank.kind must be one of {FBANK_KINDS}, got {cfg.fbank.kind!r}")
    t0 = time.perf_counter()
    storage.check_reachable(input_uri)
    storage.check_reachable(output_root, must_exist=False)
    manifest = build_manifest(input_uri, probe=False)
    fdir = layout.features_dir(output_root)
    seen = feature_log(fdir).entries()
    start_seq = seen[-1][0] if seen else -1  # commits after this one are concurrent runs'
    commits = read_commits(fdir, log=False) + [entry for _, entry in seen]
    vacuum(fdir, {rel for c in commits for rel in c["files"]}, cfg.vacuum_after_s)
    known, rejected = committed_keys(commits)
    storage.write_table(layout.manifest_uri(output_root), manifest.table)

    listing_problems = [p for p in manifest.problems if p.clip_id not in rejected]
    todo = manifest.table
    usual_s = (usual_lengths(manifest.table, [r for r in (reference_root, output_root) if r], cfg.sensor)
               if cfg.sensor.enabled and todo.num_rows else {})
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    run_dir = storage.join(fdir, "_staging", run_id)
    # side outputs (quarantine parts, attempt markers) live beside the Parquet sink's folder, never inside it
    staging = storage.join(run_dir, "data")
    qdir = storage.join(run_dir, "quarantine")
    attempts = storage.join(run_dir, "attempts")
    files: list[str] = []
    with Heartbeat(storage.join(run_dir, ALIVE)):  # other runs' vacuum leaves a live run's files alone
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
                fn_kwargs=dict(cfg=cfg, known_ref=known_ref, quarantine_dir=qdir, run_id=run_id, attempts_dir=attempts,
                               usual_s=usual_s),
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
            files = staged_files(staging)
        problems = [asdict(p) for p in listing_problems] + _read_staged_quarantine(qdir)
        commit, n_lost = (commit_run(fdir, staging, files, problems, run_id, start_seq, cfg.config_hash(), cfg.compute_stats)
                          if files or problems else (None, 0))
    storage.remove(run_dir)
    commits += [entry for _, entry in feature_log(fdir).entries(after=start_seq)]  # ours and concurrent runs'
    n_rows = commit["rows"] if commit else 0
    committed_problems = [p for p in problems if commit and p["clip_id"] in commit["rejected"]]
    n_quar = len(committed_problems)
    elapsed = time.perf_counter() - t0
    last = {"run_id": run_id, "featurized": n_rows, "quarantined": n_quar, "lost_race": n_lost,
            "seconds": round(elapsed, 3), "clips_per_s": round(n_rows / elapsed, 3) if elapsed else 0.0}
    summary_uri = storage.atomic_write_json(storage.join(fdir, "_SUMMARY.json"), _summary(fdir, commits, last, cfg, usual_s))
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


def usual_lengths(manifest: pa.Table, roots: list[str], cfg: SensorConfig) -> dict[str, float]:
    """Each machine type's usual clip length in seconds, for the ``short`` sensor check: the median
    length of its committed clips in the first of ``roots`` that has any; for a type none has (a
    corpus's first run), the median of the header lengths of ``cfg.probe_clips`` of its clips in
    the manifest, evenly spread over its training clips (else all of its clips)."""
    out: dict[str, float] = {}
    for root in roots:
        for mt, median in duration_medians(root).items():
            out.setdefault(mt, median)
    rows = manifest.select(["machine_type", "split", "path"]).to_pylist()
    for mt in sorted({r["machine_type"] for r in rows} - set(out)):
        own = [r for r in rows if r["machine_type"] == mt]
        pool = [r for r in own if r["split"] == "train"] or own
        picks = pool[:: max(1, -(-len(pool) // max(1, cfg.probe_clips)))][: cfg.probe_clips]
        lengths = []
        for r in picks:
            try:
                lengths.append(audio.probe(storage.read_bytes(r["path"])).duration_s)
            except (audio.AudioError, OSError):
                continue  # a bad clip is quarantined by its task; it tells no length
        if lengths:
            out[mt] = float(np.median(lengths))
    return out


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


def _featurize_udf(batch, cfg, known_ref, quarantine_dir, run_id, attempts_dir=None, usual_s=None):
    import ray

    if isinstance(known_ref, tuple):
        known, rejected = known_ref
    else:
        key = known_ref.hex()
        if key not in _WORKER_KNOWN:
            _WORKER_KNOWN.clear()
            _WORKER_KNOWN[key] = ray.get(known_ref)
        known, rejected = _WORKER_KNOWN[key]
    return featurize_batch(batch, cfg, known, quarantine_dir, run_id, rejected, attempts_dir, usual_s)


def _read_staged_quarantine(qdir: str) -> list[dict]:
    fs, path = storage.filesystem(qdir)
    if not fs.exists(path):
        return []
    rows = storage.read_table(qdir).to_pylist()
    return sorted(rows, key=lambda r: r["clip_id"])


__all__ = ["FeaturizeConfig", "FeaturizeResult", "block_sizes", "featurize", "featurize_batch"]
