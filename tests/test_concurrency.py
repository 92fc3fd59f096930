"""Overlapping writers on one root: the commit log, leases, and the stores built on them
(featurize, nightly rescoring), locally and on S3 (moto)."""

import shutil
import threading
import time
from pathlib import Path

import pytest

from asd.io import commitlog, storage
from asd.io.layout import features_dir
from asd.io.serving import set_current_model
from asd.stages.embed import EmbedConfig, embed
from asd.stages.featurize import FeaturizeConfig, featurize
from asd.stages.rescore import RescoreConfig, rescore
from asd.stages.score import ScoreConfig
from asd.stores.embeddings import read_embeddings
from asd.stores.features import feature_log, files_table, read_commits, read_features_table

FCFG = FeaturizeConfig(progress=False, batch_size=8, rows_per_block=16)
RCFG = RescoreConfig(featurize=FCFG, score=ScoreConfig(progress=False))


def _run_together(fns: list) -> list:
    """Start every function at once (a barrier), return their results in order; re-raise a failure."""
    barrier = threading.Barrier(len(fns))
    out: list = [None] * len(fns)
    errors: list = []

    def go(i, fn):
        try:
            barrier.wait()
            out[i] = fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


class _Reader:
    """Reads the feature store over and over while writers run, as a reader does (the commits,
    then the files they name); each look must be whole commits: the rows are exactly the clips
    those commits name, each once, and every named file exists."""

    def __init__(self, root: str):
        self.root, self.looks, self.problems = root, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        fdir = features_dir(self.root)
        while not self._stop.is_set():
            try:
                commits = read_commits(fdir)  # one look: these commits, then exactly their files
                files = [rel for commit in commits for rel in commit["files"]]
                ids = files_table(fdir, files, ["clip_id"]).column("clip_id").to_pylist()
            except FileNotFoundError as exc:  # a file a commit names must exist
                self.problems.append(f"a committed file was missing: {exc}")
                continue
            named = [c for commit in commits for c in commit["clips"]]
            if sorted(ids) != sorted(named) or len(set(ids)) != len(ids):
                self.problems.append(f"{len(ids)} rows, {len(set(ids))} clips, commits name {len(named)}")
            self.looks += 1
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- primitives


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def place(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "place")
    return request.getfixturevalue("s3_bucket") + "/place"


def test_create_exclusive_creates_once(place):
    uri = storage.join(place, "x.json")
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_commit_log_orders_concurrent_appends(place):
    log = commitlog.CommitLog(storage.join(place, "_log"))
    calls = []

    def writer(i):
        def make(entries):
            calls.append(i)
            return {"writer": i, "saw": len(entries)}
        return lambda: log.append(make)

    got = _run_together([writer(i) for i in range(6)])
    entries = log.entries()
    assert [seq for seq, _ in entries] == list(range(6))
    assert sorted(e["writer"] for _, e in entries) == list(range(6))
    assert all(e["saw"] == seq for seq, e in entries)  # each entry was built from everything before it
    assert sorted(seq for seq, _ in got) == list(range(6))
    assert len(calls) >= 6  # losers were asked again with the longer log


def test_lease_is_mutually_exclusive_and_an_expired_hold_is_taken_over(place):
    counter = storage.join(place, "counter.txt")
    storage.atomic_write_text(counter, "0")
    lease_dir = storage.join(place, "_lease")

    def bump():
        for _ in range(3):
            with commitlog.Lease(lease_dir, poll_s=0.01):
                n = int(storage.read_text(counter))
                time.sleep(0.01)  # a lost update would show if two held it at once
                storage.atomic_write_text(counter, str(n + 1))

    _run_together([bump, bump, bump])
    assert storage.read_text(counter) == "9"
    # a holder that died: its hold expires and the next taker gets the lease
    dead = commitlog.Lease(lease_dir, ttl_s=0.2).acquire()
    with pytest.raises(commitlog.LeaseTimeout, match="held by"):
        commitlog.Lease(lease_dir, wait_s=0.05, poll_s=0.01).acquire()
    time.sleep(0.3)
    with commitlog.Lease(lease_dir, wait_s=5, poll_s=0.01):
        pass
    dead.release()  # too late: says so and leaves the log alone
    assert commitlog.CommitLog(lease_dir).entries()[-1][1]["op"] == "release"


# ----------------------------------------------------------------------------- featurize


def test_overlapping_featurize_runs_commit_every_clip_once(ray_session, small_corpus, tmp_path):
    root = str(tmp_path / "run")
    n = len(list(Path(small_corpus).glob("*/*/*.wav")))
    with _Reader(root) as reader:
        a, b = _run_together([lambda: featurize(small_corpus, root, FCFG), lambda: featurize(small_corpus, root, FCFG)])
    ids = read_features_table(root, columns=["clip_id"]).column("clip_id").to_pylist()
    assert len(ids) == len(set(ids)) == n
    assert a.n_featurized + b.n_featurized == n  # what each committed adds up to the corpus
    assert a.n_featurized + a.n_already_done == b.n_featurized + b.n_already_done == n
    assert len(feature_log(features_dir(root)).entries()) in (1, 2)  # a loser with nothing left adds nothing
    assert reader.looks > 0 and not reader.problems, reader.problems
    # and a third run later finds everything there
    assert featurize(small_corpus, root, FCFG).n_featurized == 0


def test_a_run_killed_after_moving_its_files_leaves_nothing_visible(ray_session, small_corpus, tmp_path, monkeypatch):
    from asd.stores import features as features_mod

    root = str(tmp_path / "run")

    class Killed(BaseException):
        """The process dies between moving its files into place and creating its log entry."""

    def killed(entries):
        raise Killed

    real_log = features_mod.feature_log

    class DyingLog(commitlog.CommitLog):
        def append(self, make, **kw):
            return killed([])

    monkeypatch.setattr(features_mod, "feature_log", lambda fdir: DyingLog(real_log(fdir).uri))
    with pytest.raises(Killed):
        featurize(small_corpus, root, FCFG)
    monkeypatch.undo()
    moved = list(Path(features_dir(root)).glob("machine_type=*/section=*/*.parquet"))
    assert moved  # its files are in place ...
    assert read_commits(features_dir(root)) == [] and read_features_table(root).num_rows == 0  # ... and invisible
    again = featurize(small_corpus, root, FCFG)
    assert again.n_featurized == read_features_table(root).num_rows == len(list(Path(small_corpus).glob("*/*/*.wav")))


# ----------------------------------------------------------------------------- nightly rescoring


@pytest.fixture(scope="module")
def served_root(ray_session, small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    featurize(small_corpus, str(root), FCFG)
    embed(str(root), "logmel", EmbedConfig(progress=False))
    set_current_model(str(root), "logmel", "logmel_stats", {})
    return root


def _inbox(corpus, inbox: Path, n: int) -> list[Path]:
    files = sorted(Path(corpus).glob("*/test/*.wav"))[:n]
    for i, f in enumerate(files):
        dst = inbox / f.parent.parent.name / "test" / f"section_00_{i:04d}.wav"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    return files


def _overlapping_rescores(inbox: str, root: str, date: str, n_runs: int) -> list:
    """``n_runs`` rescoring runs of one night, each in its own process with its own Ray, started
    together (separate drivers, as overlapping scheduled and manual runs are). As threads of one
    driver on the 2-CPU test cluster they deadlock inside Ray Data instead (each dataset's
    embedding actors and read tasks hold part of the CPUs and wait for the rest), which says
    nothing about the stores."""
    import json
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    start_at = time.time() + 20  # after every process has started its Ray
    env = dict(os.environ, RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("concurrent_job.py")), inbox, root, date,
                               str(start_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n_runs)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        results.append(SimpleNamespace(**json.loads(out.strip().splitlines()[-1])))
    return results


def _check_night(root: str, date: str, results: list, n: int) -> None:
    part = storage.join(root, "rescore", f"date={date}")
    scores = storage.read_table(storage.join(part, "scores.parquet"))
    keys = list(zip(scores.column("clip_id").to_pylist(), scores.column("content_sha256").to_pylist()))
    assert len(keys) == len(set(keys)) == n  # every clip key once in the night's scores
    assert storage.read_json(storage.join(part, "summary.json"))["clips"] == n
    work = storage.join(root, "rescore", "_work", f"date={date}")
    feats = read_features_table(work, columns=["clip_id", "content_sha256"])
    assert feats.num_rows == len(set(feats.column("clip_id").to_pylist())) == n  # ... in the feature store
    for r in results:
        emb = read_embeddings(storage.join(work, "embeddings", "logmel"), columns=["clip_id"])
        assert emb.num_rows == len(set(emb.column("clip_id").to_pylist())) == n  # ... in the embeddings
        assert r.n_inbox == n and r.n_new + r.n_already_scored == n
    assert sum(r.n_new for r in results) == n  # each clip scored by exactly one run


def test_overlapping_nightly_runs_score_every_clip_once(served_root, small_corpus, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(served_root, root)
    set_current_model(str(root), "logmel", "logmel_stats", {})
    inbox = tmp_path / "inbox"
    n = len(_inbox(small_corpus, inbox, 20))
    with _Reader(str(root / "rescore" / "_work" / "date=2026-12-01")) as reader:
        results = _overlapping_rescores(str(inbox), str(root), "2026-12-01", 2)
    _check_night(str(root), "2026-12-01", results, n)
    assert not reader.problems, reader.problems


@pytest.mark.s3
@pytest.mark.slow
def test_three_overlapping_nightly_runs_on_s3(served_root, small_corpus, s3_bucket, tmp_path):
    root = f"{s3_bucket}/root"
    fs, _ = storage.filesystem(root)
    fs.put(str(served_root) + "/", root + "/", recursive=True)
    set_current_model(root, "logmel", "logmel_stats", {})
    local_inbox = tmp_path / "inbox"
    n = len(_inbox(small_corpus, local_inbox, 12))
    inbox = f"{s3_bucket}/inbox/2026-12-02"
    fs.put(str(local_inbox) + "/", inbox + "/", recursive=True)
    with _Reader(f"{root}/rescore/_work/date=2026-12-02") as reader:
        results = _overlapping_rescores(inbox, root, "2026-12-02", 3)
    _check_night(root, "2026-12-02", results, n)
    assert reader.looks > 0 and not reader.problems, reader.problems
    # rerun: nothing new, nothing duplicated
    again = rescore(inbox, root, date="2026-12-02", cfg=RCFG)
    assert again.n_new == 0 and not again.changed
    _check_night(root, "2026-12-02", results, n)


def test_scores_table_is_queryable_by_another_engine(served_root, small_corpus, tmp_path):
    """The nightly scores are plain hive-partitioned Parquet: DuckDB and pyarrow's dataset reader
    query them directly (the README's example)."""
    root = tmp_path / "root"
    shutil.copytree(served_root, root)
    set_current_model(str(root), "logmel", "logmel_stats", {})
    inbox = tmp_path / "inbox"
    n = len(_inbox(small_corpus, inbox, 6))
    rescore(str(inbox), str(root), date="2026-12-03", cfg=RCFG)
    import pyarrow.dataset as pds

    table = pds.dataset(str(root / "rescore"), format="parquet", partitioning="hive",
                        exclude_invalid_files=True).to_table(filter=pds.field("date") == "2026-12-03")
    assert table.num_rows == n
    import duckdb
    rows = duckdb.sql(f"SELECT date, count(*) AS clips, sum(decision) AS anomalies "
                      f"FROM read_parquet('{root}/rescore/date=*/scores.parquet', hive_partitioning=true) "
                      f"GROUP BY date").fetchall()
    assert [(str(d), c, a) for d, c, a in rows] == [("2026-12-03", n, int(table.column("decision").to_numpy().sum()))]
