"""The complete real DCASE 2023 ToyCar development set in the workflow: ``data=toycar`` reads it, its
files are listed and described as the DCASE layout says (skipped where the set is not built)."""

from __future__ import annotations

from collections import Counter

import pytest

pytestmark = pytest.mark.real_data


def test_data_toycar_names_the_set_under_asd_real_data(monkeypatch, tmp_path):
    from jobs.common import compose_config

    monkeypatch.setenv("ASD_REAL_DATA", str(tmp_path))
    cfg = compose_config("evaluate", ["data=toycar"])
    assert cfg.data.input == f"{tmp_path}/dcase2023_toycar_dev" and cfg.data.generate is False


def test_the_set_is_complete_with_its_domains_labels_and_attributes(toycar_dev):
    from asd.data.manifest import build_manifest

    m = build_manifest(str(toycar_dev), probe=True, workers=4)
    assert not m.problems, m.problems[:3]
    rows = m.table.to_pylist()
    counts = Counter((r["split"], r["domain"], r["label"]) for r in rows)
    assert counts == {("train", "source", "normal"): 988, ("train", "target", "normal"): 10,
                      ("test", "source", "normal"): 48, ("test", "source", "anomaly"): 50,
                      ("test", "target", "normal"): 50, ("test", "target", "anomaly"): 50}
    assert {r["machine_type"] for r in rows} == {"ToyCar"} and {r["section"] for r in rows} == {"00"}
    assert {(r["sample_rate"], r["channels"]) for r in rows} == {(16000, 1)}
    assert min(r["duration_s"] for r in rows) == pytest.approx(12.0, abs=0.01)
    # the attributes ToyCar names (car model, speed, microphone) are known for every training clip
    train = [dict(r["attributes"]) for r in rows if r["split"] == "train"]
    assert all({"car", "spd", "mic"} <= set(a) for a in train)
    assert len({(a["car"], a["spd"], a["mic"]) for a in train}) > 10
