"""Tests for the realistic corpus presets (asd.data.realistic) and their make_corpus dispatch."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from asd.data import machines as M
from asd.data import realistic as R
from asd.data.manifest import build_manifest

NO_ATTR = "noAttribute"


def _tiny(**kw) -> R.RealisticSpec:
    base = dict(n_train_source=4, n_train_target=2, n_test_per_domain=4, duration_s=0.5)
    return R.preset_spec("realistic_small", **(base | kw))


def _read_all(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("realistic")
    info = R.make_corpus(_tiny(), str(root), workers=1, progress=False)
    return root, info


def test_deterministic_and_independent_of_workers(tiny_corpus, tmp_path):
    root, info = tiny_corpus
    R.make_corpus(_tiny(), str(tmp_path / "b"), workers=2, progress=False)
    a = _read_all(root)
    assert len([f for f in a if f.endswith(".wav")]) == info.n_clips
    assert a == _read_all(tmp_path / "b")
    assert not [f for f in a if ".tmp" in f]


def test_seed_changes_audio(tmp_path):
    spec0 = dataclasses.replace(_tiny(seed=0), machine_types=M.realistic_machines()[:1])
    spec1 = dataclasses.replace(spec0, seed=1)
    R.make_corpus(spec0, str(tmp_path / "s0"), progress=False)
    R.make_corpus(spec1, str(tmp_path / "s1"), progress=False)
    a, b = _read_all(tmp_path / "s0"), _read_all(tmp_path / "s1")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".wav"))


def test_types_layout_and_manifest(tiny_corpus):
    root, info = tiny_corpus
    spec = _tiny()
    types = {m.name: m for m in spec.machine_types}
    assert len(types) >= 6
    assert sum(not m.attributes for m in types.values()) >= 2
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(types)
    for name, m in types.items():
        names = [p.name for p in (root / name / "train").glob("*.wav")]
        assert len(names) == spec.n_train_source + spec.n_train_target
        assert len(list((root / name / "test").glob("*.wav"))) == 2 * spec.n_test_per_domain
        assert all(n.startswith("section_00_") for n in names)
        has_csv = (root / name / "attributes_00.csv").exists()
        assert has_csv == m.attributes
        assert all(n.endswith(f"_{NO_ATTR}.wav") for n in names) == (not m.attributes)

    manifest = build_manifest(str(root), workers=2)
    assert not manifest.problems
    table = manifest.table.to_pylist()
    assert len(table) == info.n_clips
    assert {r["machine_type"] for r in table} == set(types)
    assert {r["domain"] for r in table} == {"source", "target"}
    assert {r["label"] for r in table} == {"normal", "anomaly"}
    assert {r["split"] for r in table} == {"train", "test"}


def test_attribute_csv_and_unseen_target_values(tiny_corpus):
    root, _ = tiny_corpus
    for m in _tiny().machine_types:
        # every type's target domain has at least one attribute value never used in source
        assert any(set(m.target[k]) - set(m.source[k]) for k in m.source), m.name
        if not m.attributes:
            continue
        rows = list(csv.reader(io.StringIO((root / m.name / "attributes_00.csv").read_text())))
        assert rows[0][0] == "file_name" and rows[0][1:3] == ["d1p", "d1v"]
        files = {r[0] for r in rows[1:]}
        assert files == {f"{m.name}/{p.parent.name}/{p.name}" for p in (root / m.name).glob("*/*.wav")}
        for r in rows[1:]:
            attrs = dict(zip(r[1::2], r[2::2]))
            assert "_".join(f"{k}_{v}" for k, v in attrs.items()) in r[0]


def test_audio_format(tiny_corpus):
    root, _ = tiny_corpus
    wav = next(root.glob("fan/test/*.wav"))
    x, sr = sf.read(wav, dtype="float32")
    info = sf.info(wav)
    assert sr == 16000 and info.subtype == "PCM_16" and info.channels == 1
    assert len(x) == int(0.5 * 16000) and 0 < np.abs(x).max() <= 1.0


@pytest.mark.parametrize("machine", M.realistic_machines(), ids=lambda m: m.name)
def test_each_anomaly_kind_changes_the_signal(machine):
    attrs = {k: str(v[0]) for k, v in machine.source.items()}

    def clip(anomaly, strength=1.0):
        return M.synth_clip(machine, attrs, "source", anomaly, np.random.default_rng(3), 1.0, 16000, strength)

    normal = clip(None)
    assert normal.dtype == np.float32 and np.all(np.isfinite(normal))
    assert np.array_equal(normal, clip(None))  # deterministic for the rng
    for kind in M.ANOMALY_KINDS[machine.kind]:
        gain = R.preset_spec().anomaly_gains[f"{machine.kind}/{kind}"]
        x = clip(kind, gain)
        rel = np.sqrt(np.mean((x - normal) ** 2) / np.mean(normal**2))
        assert rel > 1e-3, (machine.name, kind, rel)
        assert np.array_equal(clip(kind, 0.0), normal), kind  # strength 0 = a normal clip
    with pytest.raises(ValueError):
        clip("no_such_kind")


def test_sizes_of_the_presets():
    full, small = R.preset_spec("realistic"), R.preset_spec("realistic_small")
    assert (full.n_train_source, full.n_train_target, full.n_test_per_domain, full.duration_s) == (300, 10, 50, 4.0)
    assert small.n_train_target == 10 and small.duration_s == 2.0
    assert [m.name for m in full.machine_types] == [m.name for m in small.machine_types]
    with pytest.raises(ValueError):
        R.preset_spec("realistic", backgrounds={})


@pytest.mark.parametrize("preset", sorted(R.PRESETS))
def test_preset_spec_is_frozen(preset):
    """The calibrated presets must not be retuned silently: recalibrate and re-freeze instead."""
    assert R.FROZEN_SHA256[preset] is not None
    assert R.spec_sha256(R.preset_spec(preset)) == R.FROZEN_SHA256[preset]
    assert R.spec_sha256(R.preset_spec(preset, seed=7)) == R.FROZEN_SHA256[preset]  # seed is a replicate


def test_calibration_record_matches_frozen_spec():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "calibration_realistic.json"
    if not path.exists():
        pytest.skip("no calibration record")
    rec = json.loads(path.read_text())
    for preset, entry in rec["presets"].items():
        assert entry["sha256"] == R.FROZEN_SHA256[preset]


def test_make_corpus_job_dispatches_on_generator(tmp_path, monkeypatch):
    from jobs import make_corpus as job

    conf = Path(__file__).resolve().parents[1] / "jobs" / "conf" / "data"
    for preset in ("realistic", "realistic_small"):
        data = OmegaConf.load(conf / f"{preset}.yaml")
        assert data.generator == "realistic" and data.spec.preset == preset and data.generate
        spec, make = job.build_spec(data)
        assert isinstance(spec, R.RealisticSpec) and make is R.make_corpus
        assert R.spec_sha256(spec) == R.spec_sha256(R.preset_spec(preset)) == R.FROZEN_SHA256[preset]
        data.spec.duration_s = 0.5  # a size override (null in the YAML: the preset's value)
        small, _ = job.build_spec(data)
        assert small.duration_s == 0.5 and small.n_train_source == spec.n_train_source
        assert R.spec_sha256(small) != R.FROZEN_SHA256[preset]
    spec, make = job.build_spec(OmegaConf.load(conf / "synthetic.yaml"))  # no key: synthetic
    assert type(spec).__name__ == "CorpusSpec" and make.__module__ == "asd.data.synthetic"
    with pytest.raises(ValueError):
        job.build_spec(OmegaConf.create({"generator": "nope", "spec": {}}))

    # the job: generate once, skip when the spec is unchanged, regenerate when it changed
    monkeypatch.setitem(R.PRESETS, "tiny_test", dict(name="realistic_small", n_train_source=2,
                                                     n_train_target=1, n_test_per_domain=2, duration_s=0.25))
    out = tmp_path / "corpus"
    cfg = OmegaConf.create({"out": str(out), "data": {"input": str(out), "generator": "realistic",
                                                      "spec": {"preset": "tiny_test", "seed": 0}, "workers": 1}})
    first = job.run(cfg)
    assert not first["skipped"] and first["n_clips"] == 6 * (3 + 4)
    marker = json.loads((out / job.MARKER).read_text())
    assert marker["spec"]["seed"] == 0 and marker["counts"]["fan"] == {"train": 3, "test": 4}
    assert job.run(cfg)["skipped"]
    cfg.data.spec.seed = 1
    assert not job.run(cfg)["skipped"]
