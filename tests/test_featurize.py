"""Featurization with Ray Data: content, quarantine, idempotence, increments, S3, staging."""

import os
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from asd.data import audio
from asd.data.frontend import FbankConfig, compute_fbank
from asd.data.synthetic import default_spec, make_corpus
from asd.io import storage
from asd.stages.featurize import FeaturizeConfig, block_sizes, featurize
from asd.stores.features import (
    RAW_COLUMNS,
    committed_files,
    fbank_arrays,
    load_stats,
    read_features_table,
)
from tests.test_manifest import EXPECTED_PROBLEMS, make_tiny_corpus

CFG = FeaturizeConfig(progress=False, rows_per_block=16, batch_size=8)


def _rows(root):
    t = read_features_table(root)
    return {r["clip_id"]: r for r in t.to_pylist()}


def test_features_match_a_direct_computation(ray_session, small_corpus, tmp_path):
    res = featurize(small_corpus, str(tmp_path), CFG)
    assert res.n_quarantined == 0 and res.n_featurized == res.n_listed > 0
    t = read_features_table(str(tmp_path))
    assert t.num_rows == res.n_featurized
    assert t.column("faults").to_pylist() == [[]] * t.num_rows  # the sensor checks flag no generated clip
    assert set(t.column("machine_type").to_pylist()) == {m.name for m in default_spec().machine_types}
    # one clip recomputed by hand: soundfile decode + Kaldi fbank
    import soundfile as sf

    row = t.slice(0, 1)
    path = row.column("path")[0].as_py()
    wave, sr = sf.read(path, dtype="float32")
    ref = compute_fbank(wave, FbankConfig()).astype(np.float16).astype(np.float32)
    got = fbank_arrays(row)[0]
    assert got.shape == (198, 128) and np.array_equal(got, ref)
    # partitioned by machine type and section on disk
    files = committed_files(str(tmp_path))
    assert all("/machine_type=" in f and "/section=00/" in f for f in files)
    # normalisation statistics over training normals, per type and overall
    stats = load_stats(str(tmp_path))
    assert set(stats["per_type"]) == set(t.column("machine_type").to_pylist())
    train = [a for a, s, l in zip(fbank_arrays(t), t.column("split").to_pylist(), t.column("label").to_pylist())
             if s == "train" and l == "normal"]
    frames = np.concatenate(train).astype(np.float64)
    assert np.allclose(stats["all"]["mean"], frames.mean(0), atol=1e-3)
    assert np.allclose(stats["all"]["std"], frames.std(0), atol=1e-3)
    for mt, st in stats["per_type"].items():  # each type's sums from its own rows only
        own = np.concatenate([a for a, m, s, l in zip(fbank_arrays(t), t.column("machine_type").to_pylist(),
                                                      t.column("split").to_pylist(), t.column("label").to_pylist())
                              if m == mt and s == "train" and l == "normal"]).astype(np.float64)
        assert np.allclose(st["mean"], own.mean(0), atol=1e-3) and np.allclose(st["std"], own.std(0), atol=1e-3)
    summary = storage.read_json(res.summary_uri)
    assert summary["clips"] == res.n_featurized and summary["rejected"] == {}
    # feature bytes stored raw (no dictionary, compression or statistics), other columns as pyarrow
    # writes them; row groups of one batch
    for f in files:
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            assert rg.num_rows <= CFG.batch_size
            cols = {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}
            for name in RAW_COLUMNS:
                assert cols[name].compression == "UNCOMPRESSED" and not cols[name].is_stats_set
                assert not any("DICTIONARY" in e for e in cols[name].encodings)
            assert cols["clip_id"].compression == "SNAPPY" and cols["clip_id"].is_stats_set


@pytest.mark.parametrize("n, slots, max_rows, min_rows", [
    (2000, 2, 512, 64), (2000, 2, 256, 64), (100_000, 64, 512, 64), (37, 2, 16, 8), (5, 4, 512, 64), (1, 1, 1, 1),
    (130, 2, 512, 64), (130, 1, 16, 8), (100, 2, 512, 64),
])
def test_block_sizes_shrink_toward_the_end(n, slots, max_rows, min_rows):
    sizes = block_sizes(n, slots, max_rows, min_rows)
    assert sum(sizes) == n
    assert all(s <= max_rows for s in sizes)
    assert sizes == sorted(sizes, reverse=True) or sizes[:-1] == sorted(sizes[:-1], reverse=True)
    assert all(s >= min(min_rows, n) for s in sizes)
    assert sizes[-1] < 2 * min_rows or sizes[-1] == max_rows  # a remainder joins a small last block
    if n >= 2 * slots * max_rows:
        assert sizes[0] == max_rows  # big corpora: full blocks until the tail
    if n > max_rows:
        assert sizes[-1] < max_rows  # the last tasks are smaller than the first
    # few tasks: full blocks, then a tail that shrinks by 1/(2 x slots) a block (2 x slots x ln(max/min) blocks)
    assert len(sizes) <= -(-n // max_rows) + 2 * slots * (np.log(max_rows / min_rows) + 1)


def test_block_sizes_of_the_benchmark_corpus():
    assert block_sizes(2000, 2, 512, 64) == [500, 375, 282, 211, 158, 119, 89, 67, 64, 64, 71]
    assert block_sizes(0, 2, 512, 64) == []


def test_bad_files_are_quarantined_and_the_job_finishes(ray_session, tmp_path):
    make_tiny_corpus(tmp_path / "in")
    res = featurize(str(tmp_path / "in"), str(tmp_path / "out"), FeaturizeConfig(progress=False, min_duration_s=0.5))
    assert res.n_featurized == 2 + 1  # two good clips and the stereo 44.1 kHz one (resampled)
    q = pq.read_table(res.quarantine_uri).to_pylist()
    assert {r["clip_id"]: r["reason"] for r in q} == EXPECTED_PROBLEMS
    assert all(r["path"].endswith(r["clip_id"]) and r["error"] for r in q)
    stereo = _rows(str(tmp_path / "out"))["fan/train/section_00_source_train_normal_0004_speed_1_load_2.wav"]
    assert stereo["sample_rate"] == 44100 and stereo["channels"] == 2 and stereo["fbank_frames"] == 198
    assert any("resampled" in w for w in stereo["warnings"])
    # rows are built column by column around the rejects: each row's manifest columns, hash,
    # feature and per-bin sums belong to the same clip
    t = read_features_table(str(tmp_path / "out"))
    for r, fb in zip(t.to_pylist(), fbank_arrays(t)):
        assert r["path"].endswith(r["clip_id"])
        assert r["content_sha256"] == audio.sha256(open(r["path"], "rb").read())
        assert fb.shape == (r["fbank_frames"], r["num_mel_bins"])
        assert np.allclose(r["fbank_sum"], fb.sum(0, dtype=np.float64))
        assert np.allclose(r["fbank_sumsq"], np.square(fb.astype(np.float64)).sum(0))


def test_rerun_writes_nothing_and_new_clips_are_added_exactly_once(ray_session, tmp_path):
    spec = default_spec(n_train_source=6, n_train_target=2, n_test_per_domain=4, duration_s=1.0, seed=3)
    corpus = tmp_path / "in"
    make_corpus(spec, str(corpus), progress=False)
    first = featurize(str(corpus), str(tmp_path / "out"), CFG)
    n0 = first.n_featurized
    before = sorted(os.listdir(tmp_path / "out" / "features" / "_log"))

    again = featurize(str(corpus), str(tmp_path / "out"), CFG)
    assert again.n_featurized == 0 and again.n_quarantined == 0 and again.run_id is None
    assert sorted(os.listdir(tmp_path / "out" / "features" / "_log")) == before
    assert len(read_features_table(str(tmp_path / "out"))) == n0

    # five new clips arrive: a corpus from another seed, five of its files copied in under new indices
    extra = tmp_path / "extra"
    make_corpus(default_spec(n_train_source=5, n_train_target=0, n_test_per_domain=0, duration_s=1.0, seed=99,
                             machine_types=spec.machine_types[:1]), str(extra), progress=False)
    new = sorted((extra / spec.machine_types[0].name / "train").iterdir())
    assert len(new) == 5
    for i, f in enumerate(new):
        shutil.copy(f, corpus / spec.machine_types[0].name / "train" / f.name.replace("_000", f"_90{i}", 1))
    third = featurize(str(corpus), str(tmp_path / "out"), CFG)
    assert third.n_featurized == 5 and third.n_already_done == n0
    rows = _rows(str(tmp_path / "out"))
    assert len(rows) == n0 + 5


def test_changed_content_is_quarantined_not_duplicated(ray_session, tmp_path):
    make_tiny_corpus(tmp_path / "in")
    featurize(str(tmp_path / "in"), str(tmp_path / "out"), CFG)
    target = tmp_path / "in/fan/test/section_00_target_test_anomaly_0000_speed_3_load_2.wav"
    target.write_bytes(open(tmp_path / "in/fan/train/section_00_source_train_normal_0004_speed_1_load_2.wav", "rb").read())
    res = featurize(str(tmp_path / "in"), str(tmp_path / "out"), CFG)
    assert res.n_featurized == 0 and res.n_quarantined == 1
    assert pq.read_table(res.quarantine_uri).column("reason").to_pylist() == ["content_changed"]
    assert len(read_features_table(str(tmp_path / "out"))) == 3


def test_interrupted_run_is_invisible_and_cleaned_up(ray_session, small_corpus, tmp_path):
    out = tmp_path / "out"
    featurize(small_corpus, str(out), CFG)
    n = len(read_features_table(str(out)))
    # what a killed run leaves: a staging folder and a data file that was moved but never committed
    stale = out / "features" / "_staging" / "dead-run" / "machine_type=x" / "section=00"
    stale.mkdir(parents=True)
    (stale / "part.parquet").write_bytes(b"half")
    orphan = next((out / "features").glob("machine_type=*/section=*/")) / "orphan.parquet"
    shutil.copy(next((out / "features").glob("machine_type=*/section=*/*.parquet")), orphan)
    assert len(read_features_table(str(out))) == n  # readers only read committed files
    # ... and what a run still going has: a fresh heartbeat, a file moved into place, not committed yet
    live = out / "features" / "_staging" / "live-run"
    live.mkdir(parents=True)
    (live / "_alive").write_text("now\n")
    pending = orphan.parent / "live-run-part.parquet"
    shutil.copy(orphan, pending)
    long_ago = time.time() - 2 * CFG.vacuum_after_s
    for f in (stale / "part.parquet", orphan, pending):
        os.utime(f, (long_ago, long_ago))
    featurize(small_corpus, str(out), CFG)
    assert not orphan.exists() and not (out / "features" / "_staging" / "dead-run").exists()
    assert pending.exists() and (live / "_alive").exists()  # a live run's files are left alone
    assert len(read_features_table(str(out))) == n
    os.utime(live / "_alive", (long_ago, long_ago))  # its heartbeat stopped: it died
    featurize(small_corpus, str(out), CFG)
    assert not pending.exists() and not list((out / "features" / "_staging").iterdir())  # no run folder left


def test_missing_input_fails_before_writing(ray_session, tmp_path):
    with pytest.raises(storage.StorageError, match="does not exist"):
        featurize(str(tmp_path / "missing"), str(tmp_path / "out"), CFG)
    assert not (tmp_path / "out").exists()


@pytest.mark.s3
def test_s3_round_trip_matches_local(ray_session, small_corpus, tmp_path, s3_bucket):
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(small_corpus + "/", f"{s3_bucket}/corpus/", recursive=True)
    local = featurize(small_corpus, str(tmp_path / "out"), CFG)
    remote = featurize(f"{s3_bucket}/corpus", f"{s3_bucket}/run", CFG)
    assert remote.n_featurized == local.n_featurized
    cols = ["clip_id", "machine_type", "section", "domain", "split", "label", "attributes",
            "content_sha256", "fbank", "fbank_frames", "num_mel_bins"]
    a = read_features_table(str(tmp_path / "out"), columns=cols)
    b = read_features_table(f"{s3_bucket}/run", columns=cols)
    assert a.equals(b)
    assert load_stats(f"{s3_bucket}/run") == load_stats(str(tmp_path / "out"))
    # rerun on S3 writes nothing new
    assert featurize(f"{s3_bucket}/corpus", f"{s3_bucket}/run", CFG).n_featurized == 0


@pytest.mark.s3
def test_unreachable_storage_fails_before_writing(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.StorageError):
        featurize("s3://nowhere/corpus", str(tmp_path / "out"), CFG)
    assert not (tmp_path / "out").exists()


@pytest.mark.real_data
def test_real_clips_featurize_without_quarantine(ray_session, real_data, tmp_path):
    res = featurize(str(real_data), str(tmp_path), CFG)
    assert res.n_quarantined == 0 and res.n_featurized == 122
    frames = read_features_table(str(tmp_path), columns=["fbank_frames"]).column("fbank_frames").to_pylist()
    assert set(frames) <= {788, 998, 1198}  # 7.9 s, 10 s and 12 s clips at a 10 ms shift


def test_killed_worker_leaves_no_missing_or_duplicate_rows(ray_session, small_corpus, tmp_path):
    marker = tmp_path / "killed"
    cfg = FeaturizeConfig(progress=False, rows_per_block=16, batch_size=8, kill_worker_once_marker=str(marker))
    res = featurize(small_corpus, str(tmp_path / "out"), cfg)
    assert marker.exists()  # a worker really died mid-run
    t = read_features_table(str(tmp_path / "out"), columns=["clip_id"])
    ids = t.column("clip_id").to_pylist()
    expected = read_features_table_expected(small_corpus)
    assert res.n_featurized == len(ids) == len(set(ids)) == len(expected)
    assert sorted(ids) == expected


def test_a_clip_that_keeps_killing_its_worker_is_quarantined(ray_session, small_corpus, tmp_path):
    """A decoder crash or an OOM kill on one clip: Ray Data reruns the task, the attempt markers
    find the clip the worker died on, and after ``deaths_to_quarantine`` deaths it is quarantined
    as ``worker_died``; every other clip is featurized once."""
    expected = read_features_table_expected(small_corpus)
    victim = expected[3]
    cfg = FeaturizeConfig(progress=False, rows_per_block=16, batch_size=8, kill_worker_on_clip=victim)
    res = featurize(small_corpus, str(tmp_path / "out"), cfg)
    ids = read_features_table(str(tmp_path / "out"), columns=["clip_id"]).column("clip_id").to_pylist()
    assert sorted(ids) == [c for c in expected if c != victim] and res.n_featurized == len(ids)
    quarantined = storage.read_table(res.quarantine_uri).to_pylist()
    assert [(q["clip_id"], q["reason"]) for q in quarantined] == [(victim, "worker_died")]
    assert "died 2 times" in quarantined[0]["error"]


def read_features_table_expected(corpus):
    from asd.data.manifest import build_manifest

    return sorted(build_manifest(corpus, probe=False).table.column("clip_id").to_pylist())


def test_a_store_from_before_the_commit_log_is_read_and_extended(ray_session, small_corpus, tmp_path):
    """Roots featurized before the commit log (one record per run under ``_commits/``) are read
    as they are; the next run adds to the log."""
    out = tmp_path / "out"
    first = featurize(small_corpus, str(out), CFG)
    fdir = out / "features"
    before = read_features_table(str(out), columns=["clip_id"]).column("clip_id").to_pylist()
    (fdir / "_commits").mkdir()
    for entry in (fdir / "_log").glob("*.json"):  # the old layout: _commits/<run_id>.json, no log
        entry.rename(fdir / "_commits" / f"{first.run_id}.json")
    assert read_features_table(str(out), columns=["clip_id"]).column("clip_id").to_pylist() == before
    assert load_stats(str(out))["all"]["frames"] > 0
    again = featurize(small_corpus, str(out), CFG)
    assert again.n_featurized == 0 and again.n_already_done == len(before)
    assert not list((fdir / "_log").glob("*.json"))  # nothing new: nothing added
