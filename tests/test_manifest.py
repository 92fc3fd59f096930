"""Listing corpora into manifests: real clips, bad inputs, local vs S3."""

import collections
import os

import numpy as np
import pytest

from asd.data import audio
from asd.data.manifest import attributes_of, build_manifest
from asd.io import storage


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _tone(seconds=1.0, sr=16000, channels=1):
    x = 0.3 * np.sin(2 * np.pi * 300 * np.arange(int(sr * seconds)) / sr).astype(np.float32)
    return audio.encode_wav(np.stack([x] * channels, 1) if channels > 1 else x, sample_rate=sr)


def make_tiny_corpus(root):
    """Two good clips, an attributes file, and one of every kind of bad input."""
    good = _tone()
    _write(f"{root}/fan/train/section_00_source_train_normal_0000_speed_1_load_2.wav", good)
    _write(f"{root}/fan/test/section_00_target_test_anomaly_0000_speed_3_load_2.wav", good)
    _write(f"{root}/fan/attributes_00.csv",
           b"file_name,d1p,d1v,d2p,d2v\nfan/train/section_00_source_train_normal_0000_speed_1_load_2.wav,speed,1,load,2_x\n")
    _write(f"{root}/fan/train/section_00_source_train_normal_0001_speed_1_load_2.wav", good[: len(good) // 3])
    _write(f"{root}/fan/train/section_00_source_train_normal_0002_speed_1_load_2.wav", b"")
    _write(f"{root}/fan/train/section_00_source_train_normal_0003_speed_1_load_2.wav", b"hello, I am text\n" * 20)
    _write(f"{root}/fan/train/section_00_source_train_normal_0004_speed_1_load_2.wav", _tone(2.0, 44100, 2))
    _write(f"{root}/fan/train/my_recording_17.wav", good)
    _write(f"{root}/fan/train/section_00_source_train_normal_0005_speed_1_load_2.flac", b"fLaC")
    _write(f"{root}/fan/train/section_00_source_train_normal_0006_speed_1_load_2.wav", _tone(0.1))
    _write(f"{root}/README.md", b"not a clip")


EXPECTED_PROBLEMS = {
    "fan/train/section_00_source_train_normal_0001_speed_1_load_2.wav": "truncated",
    "fan/train/section_00_source_train_normal_0002_speed_1_load_2.wav": "empty",
    "fan/train/section_00_source_train_normal_0003_speed_1_load_2.wav": "not_wav",
    "fan/train/my_recording_17.wav": "unknown_name",
    "fan/train/section_00_source_train_normal_0005_speed_1_load_2.flac": "unsupported_format",
    "fan/train/section_00_source_train_normal_0006_speed_1_load_2.wav": "too_short",
}


def test_bad_inputs_each_get_one_report_line_and_listing_finishes(tmp_path, caplog):
    make_tiny_corpus(tmp_path)
    m = build_manifest(str(tmp_path), probe=True, min_duration_s=0.5)
    got = {p.clip_id: p.reason for p in m.problems}
    assert got == EXPECTED_PROBLEMS
    assert all(p.path.endswith(p.clip_id) and p.error for p in m.problems)
    # one log line per rejected file, naming it
    rejected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected")]
    assert len(rejected) == len(EXPECTED_PROBLEMS)
    # good clips (including the stereo 44.1 kHz one, with warnings) are listed
    rows = {r["clip_id"]: r for r in m.table.to_pylist()}
    assert len(rows) == 3
    stereo = rows["fan/train/section_00_source_train_normal_0004_speed_1_load_2.wav"]
    assert stereo["sample_rate"] == 44100 and stereo["channels"] == 2
    assert any("downmixed" in w for w in stereo["warnings"]) and any("resampled" in w for w in stereo["warnings"])
    # the attributes csv wins over the name
    first = rows["fan/train/section_00_source_train_normal_0000_speed_1_load_2.wav"]
    assert dict(first["attributes"]) == {"speed": "1", "load": "2_x"}
    assert first["content_sha256"] and first["duration_s"] == pytest.approx(1.0)
    assert m.problems_table.num_rows == len(EXPECTED_PROBLEMS)


def test_names_only_manifest_needs_no_reads(tmp_path):
    make_tiny_corpus(tmp_path)
    m = build_manifest(str(tmp_path), probe=False)
    # without probing, only name/layout/format problems are known
    assert {p.reason for p in m.problems} == {"unknown_name", "unsupported_format"}
    assert m.table.num_rows == 7
    assert m.table.column("sample_rate").null_count == 7


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(storage.StorageError, match="does not exist"):
        build_manifest(str(tmp_path / "nope"))


@pytest.mark.real_data
def test_real_roboticarm_manifest_from_names(real_data):
    m = build_manifest(str(real_data / "dcase2024_roboticarm"), probe=False)
    assert m.table.num_rows == 96 and m.problems == []
    counts = collections.Counter(
        (r["split"], r["domain"], r["label"]) for r in m.table.select(["split", "domain", "label"]).to_pylist()
    )
    assert counts == {
        ("train", "source", "normal"): 39,
        ("test", "source", "normal"): 15,
        ("test", "source", "anomaly"): 12,
        ("test", "target", "normal"): 14,
        ("test", "target", "anomaly"): 16,
    }
    assert set(m.table.column("machine_type").to_pylist()) == {"RoboticArm"}


@pytest.mark.real_data
def test_real_corpus_probe_all_valid(real_data):
    m = build_manifest(str(real_data), probe=True)
    assert m.table.num_rows == 122 and m.problems == []
    assert set(m.table.column("sample_rate").to_pylist()) == {16000}
    assert set(m.table.column("channels").to_pylist()) == {1}
    fan = [a for a, t in zip(attributes_of(m.table), m.table.column("machine_type").to_pylist()) if t == "fan"]
    assert fan and all(set(a) == {"m-n"} for a in fan)


@pytest.mark.s3
def test_s3_listing_matches_local(tmp_path, s3_bucket):
    import fsspec  # noqa: F401

    make_tiny_corpus(tmp_path)
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(tmp_path) + "/", s3_bucket + "/corpus/", recursive=True)
    local = build_manifest(str(tmp_path), probe=True, min_duration_s=0.5)
    remote = build_manifest(s3_bucket + "/corpus", probe=True, min_duration_s=0.5)
    drop = ["path"]
    assert remote.table.drop_columns(drop).equals(local.table.drop_columns(drop))
    assert all(p.startswith(s3_bucket + "/corpus/") for p in remote.table.column("path").to_pylist())
    assert {p.clip_id: p.reason for p in remote.problems} == EXPECTED_PROBLEMS


@pytest.mark.s3
def test_unreachable_storage_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(storage.StorageError, match="unreachable|does not exist"):
        build_manifest("s3://no-such-bucket/corpus")
