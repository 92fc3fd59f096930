"""Sensor-fault checks: each fault made with generated audio is flagged, a healthy clip is not,
and featurize keeps the faults with the features (still featurizing the clip) and counts them."""

import numpy as np
import pytest

from asd.data import audio, sensor
from asd.data.sensor import SensorConfig, check
from tests import faulty_audio as fa

SR = fa.SR


@pytest.mark.parametrize("seed", range(5))
def test_healthy_clips_have_no_fault(seed):
    r = check(fa.healthy(2.0, seed), SR, usual_s=2.0)
    assert r.faults == []
    assert -30 < r.rms_dbfs < -15 and r.clipped_share == 0 and r.longest_zero_run_s < 0.001 and abs(r.dc_offset) < 0.01


@pytest.mark.parametrize(("wave", "fault"), [
    (fa.silent(), sensor.SILENT),
    (fa.silent(near=True), sensor.SILENT),
    (fa.clipped(), sensor.CLIPPED),
    (fa.dropout(), sensor.DROPOUT),
    (fa.dc_offset(), sensor.DC_OFFSET),
    (fa.short(), sensor.SHORT),
], ids=["digital_silence", "near_silence", "clipped", "dropout", "dc_offset", "short"])
def test_each_fault_is_flagged_alone(wave, fault):
    assert check(wave, SR, usual_s=2.0).faults == [fault]


def test_measurements_and_thresholds():
    r = check(fa.silent(), SR)
    assert r.rms_dbfs == float("-inf") and r.longest_zero_run_s == 0  # silence is silent, not a dropout
    near = check(fa.silent(near=True), SR)
    assert -80 < near.rms_dbfs < -70
    assert check(fa.silent(near=True), SR, cfg=SensorConfig(silence_dbfs=-90)).faults == []  # a lower floor
    drop = check(fa.dropout(gap_s=0.05), SR)
    assert drop.longest_zero_run_s == pytest.approx(0.05, abs=2 / SR)
    assert check(fa.dropout(gap_s=0.005), SR).faults == []  # 5 ms: below the 10 ms default
    assert check(fa.dropout(gap_s=0.005), SR, cfg=SensorConfig(dropout_min_s=0.002)).faults == [sensor.DROPOUT]
    assert check(fa.dc_offset(offset=0.1), SR).dc_offset == pytest.approx(0.1, abs=0.01)
    assert check(fa.clipped(), SR).clipped_share > 0.05
    # one peak-normalised sample at full scale is not clipping
    peak = fa.healthy()
    peak[100] = 1.0
    assert check(peak, SR).faults == []
    # zeros at the very start or end are not inside the clip
    edge = fa.healthy()
    edge[:1600] = 0
    assert check(edge, SR).faults == []
    # the short check needs the type's usual length
    assert check(fa.short(), SR).faults == [] and check(fa.short(), SR, usual_s=2.0).faults == [sensor.SHORT]
    assert check(fa.short(1.2), SR, usual_s=2.0).faults == []  # 60 % of the usual length: not "much shorter"


def test_checks_run_on_the_files_own_rate_before_resampling():
    """A 44.1 kHz stereo clip with a dropout in both channels: decode keeps its native mono samples,
    where the zeros are exact (resampling would smear them)."""
    x = fa.dropout()
    t = np.interp(np.arange(int(x.size * 44100 / SR)) * SR / 44100, np.arange(x.size), x).astype(np.float32)
    zero = np.flatnonzero(t == 0)
    dec = audio.decode(audio.encode_wav(np.stack([t, t], axis=1), 44100, "FLOAT"))
    assert dec.sample_rate == SR and dec.source.sample_rate == 44100 and dec.mono.size == t.size
    assert zero.size > 0.04 * 44100 and np.all(dec.mono[zero] == 0)
    assert check(dec.mono, 44100).faults == [sensor.DROPOUT]


FAULTY = {"silent": fa.silent(), "near_silent": fa.silent(near=True), "clipped": fa.clipped(1),
          "dropout": fa.dropout(seed=2), "dc": fa.dc_offset(seed=3), "short": fa.short(seed=4)}
EXPECT = {"silent": ["silent"], "near_silent": ["silent"], "clipped": ["clipped"], "dropout": ["dropout"],
          "dc": ["dc_offset"], "short": ["short"]}


def make_faulty_corpus(root) -> dict[str, str]:
    """One machine type: five healthy training clips, two healthy test clips and one test clip per
    fault. Returns clip_id -> what it is."""
    from pathlib import Path

    what = {}

    def put(rel, wave, kind):
        p = Path(root) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(audio.encode_wav(wave, SR))
        what[rel] = kind

    for i in range(5):
        put(f"fan/train/section_00_source_train_normal_{i:04d}_a_1.wav", fa.healthy(seed=10 + i), "healthy")
    for i in range(2):
        put(f"fan/test/section_00_source_test_normal_{i:04d}_a_1.wav", fa.healthy(seed=20 + i), "healthy")
    for i, (kind, wave) in enumerate(FAULTY.items()):
        put(f"fan/test/section_00_source_test_anomaly_{i:04d}_a_1.wav", wave, kind)
    return what


def test_featurize_keeps_faults_with_the_features_and_counts_them(ray_session, tmp_path):
    from asd.io import storage
    from asd.stages.featurize import FeaturizeConfig, featurize
    from asd.stores.features import read_features_table

    what = make_faulty_corpus(tmp_path / "corpus")
    res = featurize(str(tmp_path / "corpus"), str(tmp_path / "root"), FeaturizeConfig(progress=False, batch_size=4))
    assert res.n_featurized == len(what) and res.n_quarantined == 0  # faulty clips are featurized too
    rows = {r["clip_id"]: r for r in read_features_table(str(tmp_path / "root")).to_pylist()}
    assert {c: r["faults"] for c, r in rows.items()} == {c: EXPECT.get(k, []) for c, k in what.items()}
    assert all(r["fbank_frames"] > 0 for r in rows.values())
    silent = next(r for c, r in rows.items() if what[c] == "silent")
    assert silent["rms_dbfs"] == float("-inf") and silent["zero_run_s"] == 0
    summary = storage.read_json(res.summary_uri)
    assert summary["sensor_faults"] == {"clips": 6, "clipped": 1, "dc_offset": 1, "dropout": 1, "short": 1, "silent": 2}
    assert summary["usual_duration_s"] == {"fan": pytest.approx(2.0)}  # probed from the training clips' headers
    # a second run adds a short clip: the usual length now comes from the committed clips
    from pathlib import Path

    late = Path(tmp_path / "corpus/fan/test/section_00_source_test_anomaly_0099_a_1.wav")
    late.write_bytes(audio.encode_wav(fa.short(0.7, seed=9), SR))
    again = featurize(str(tmp_path / "corpus"), str(tmp_path / "root"), FeaturizeConfig(progress=False))
    assert again.n_featurized == 1
    faults = dict(read_features_table(str(tmp_path / "root"), columns=["clip_id", "faults"]).to_pylist()[i].values()
                  for i in range(len(what) + 1))
    assert faults[late.relative_to(tmp_path / "corpus").as_posix()] == ["short"]
    assert storage.read_json(again.summary_uri)["sensor_faults"]["short"] == 2


def test_sensor_checks_can_be_turned_off_and_old_stores_read_as_unchecked(ray_session, tmp_path):
    import pyarrow.parquet as pq

    from asd.stages.featurize import FeaturizeConfig, featurize
    from asd.stores.features import SENSOR_COLUMNS, committed_files, read_features_table

    make_faulty_corpus(tmp_path / "corpus")
    featurize(str(tmp_path / "corpus"), str(tmp_path / "off"),
              FeaturizeConfig(progress=False, sensor=SensorConfig(enabled=False)))
    off = read_features_table(str(tmp_path / "off"), columns=["clip_id", "faults", "rms_dbfs"])
    assert off.column("faults").null_count == off.num_rows == 13
    # a store featurized before the checks existed: its files have no sensor columns
    featurize(str(tmp_path / "corpus"), str(tmp_path / "old"), FeaturizeConfig(progress=False))
    for f in committed_files(str(tmp_path / "old")):
        pq.write_table(pq.read_table(f).drop_columns(SENSOR_COLUMNS), f)
    old = read_features_table(str(tmp_path / "old"))
    assert old.num_rows == 13 and all(old.column(c).null_count == 13 for c in SENSOR_COLUMNS)
    assert read_features_table(str(tmp_path / "old"), columns=["clip_id", "faults"]).column("faults").null_count == 13
