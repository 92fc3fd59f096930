"""Tests for the synthetic DCASE-like corpus generator (asd.data.synthetic)."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from sklearn.metrics import roc_auc_score

from asd.data.dcase import DOMAINS
from asd.data.synthetic import (
    MachineSpec,
    default_spec,
    make_corpus,
    synth_clip,
)

NAME_RE = re.compile(r"section_(\d\d)_(source|target)_(train|test)_(normal|anomaly)_(\d{4})_(.+)\.wav")


# ----------------------------------------------------------------------------- helpers


def _embed(wave: np.ndarray) -> np.ndarray:
    """L2-normalised per-mel-bin mean and std of a 128-bin Kaldi log-mel fbank."""
    fb = torchaudio.compliance.kaldi.fbank(
        torch.from_numpy(np.asarray(wave, dtype=np.float32))[None] * 32768,
        num_mel_bins=128, frame_length=25, frame_shift=10, sample_frequency=16000, dither=0.0,
    )
    e = torch.cat([fb.mean(0), fb.std(0)]).numpy()
    return e / np.linalg.norm(e)


def _wav_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*.wav"))


@pytest.fixture
def one_torch_thread():
    """Small fbank calls are fastest (and robust to a loaded machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _knn_aucs(root: Path) -> dict[tuple[str, str], float]:
    """AUC per (type, domain): score = min over source/target train banks of 1 - max cos sim."""
    aucs = {}
    for type_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        train = sorted((type_dir / "train").glob("*.wav"))
        bank = np.stack([_embed(sf.read(p, dtype="float32")[0]) for p in train])
        is_source = np.array(["_source_" in p.name for p in train])
        for domain in DOMAINS:
            test = sorted((type_dir / "test").glob(f"*_{domain}_*.wav"))
            sims = np.stack([_embed(sf.read(p, dtype="float32")[0]) for p in test]) @ bank.T
            score = np.minimum(1 - sims[:, is_source].max(1), 1 - sims[:, ~is_source].max(1))
            labels = ["_anomaly_" in p.name for p in test]
            aucs[(type_dir.name, domain)] = roc_auc_score(labels, score)
    return aucs


def _tiny_spec(**kw):
    base = dict(n_train_source=6, n_train_target=2, n_test_per_domain=4, duration_s=0.5,
                sections=("00", "01"))
    return default_spec(**(base | kw))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[float, tuple[Path, object]]:
    """The default spec (2 s clips) at three anomaly strengths."""
    out = {}
    for strength in (0.3, 1.0, 3.0):
        root = tmp_path_factory.mktemp(f"synth_{strength}")
        info = make_corpus(default_spec(anomaly_strength=strength), str(root), progress=False)
        out[strength] = (root, info)
    return out


@pytest.fixture(scope="module")
def corpus(corpora):
    return corpora[1.0]


# ----------------------------------------------------------------------------- determinism


def _read_all(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_independent_of_workers(tmp_path):
    spec = _tiny_spec()
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    info = make_corpus(spec, str(a), workers=1, progress=False)
    make_corpus(spec, str(b), workers=1, progress=False)
    make_corpus(spec, str(c), workers=2, progress=False)
    files_a = _read_all(a)
    assert len([f for f in files_a if f.endswith(".wav")]) == info.n_clips
    assert files_a == _read_all(b)
    assert files_a == _read_all(c)
    assert not [f for f in files_a if ".tmp" in f]  # no staging leftovers


def test_seed_changes_audio(tmp_path):
    make_corpus(_tiny_spec(seed=0), str(tmp_path / "s0"), progress=False)
    make_corpus(_tiny_spec(seed=1), str(tmp_path / "s1"), progress=False)
    a, b = _read_all(tmp_path / "s0"), _read_all(tmp_path / "s1")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".wav"))


def test_normal_clips_do_not_depend_on_anomaly_strength(corpora):
    (weak, _), (strong, _) = corpora[0.3], corpora[3.0]
    normal = [p.relative_to(weak) for p in _wav_files(weak) if "_normal_" in p.name]
    anomaly = [p.relative_to(weak) for p in _wav_files(weak) if "_anomaly_" in p.name]
    assert all((weak / r).read_bytes() == (strong / r).read_bytes() for r in normal)
    assert all((weak / r).read_bytes() != (strong / r).read_bytes() for r in anomaly)


# ----------------------------------------------------------------------------- layout


def test_names_and_counts(corpus):
    root, info = corpus
    spec = default_spec()
    files = _wav_files(root)
    assert sorted(str(p.relative_to(root)) for p in files) == sorted(info.files)
    assert info.n_clips == len(files)
    n_anom = spec.n_test_per_domain // 2
    expected = {
        ("source", "train", "normal"): spec.n_train_source,
        ("target", "train", "normal"): spec.n_train_target,
        ("source", "test", "normal"): spec.n_test_per_domain - n_anom,
        ("source", "test", "anomaly"): n_anom,
        ("target", "test", "normal"): spec.n_test_per_domain - n_anom,
        ("target", "test", "anomaly"): n_anom,
    }
    for machine in spec.machine_types:
        groups: dict[tuple, list[int]] = {}
        for p in (root / machine.name).glob("*/*.wav"):
            m = NAME_RE.fullmatch(p.name)
            assert m, p.name
            section, domain, split, label, index, suffix = m.groups()
            assert p.parent.name == split and section == "00"
            if machine.attributes:
                tokens = suffix.split("_")
                assert len(tokens) % 2 == 0 and tokens[0::2][0] == "speed", suffix
            else:
                assert suffix == "noAttribute"
            groups.setdefault((domain, split, label), []).append(int(index))
        assert {k: len(v) for k, v in groups.items()} == expected
        for indices in groups.values():  # indices 0000..n-1, unique per group
            assert sorted(indices) == list(range(len(indices)))
        assert info.counts[machine.name] == {
            "train": spec.n_train_source + spec.n_train_target,
            "test": 2 * spec.n_test_per_domain,
        }


def test_target_speeds_unseen_in_source(corpus):
    root, _ = corpus
    for type_dir in root.iterdir():
        if not (type_dir / "attributes_00.csv").exists():
            continue
        speeds = {d: set() for d in DOMAINS}
        for p in type_dir.glob("*/*.wav"):
            domain, suffix = NAME_RE.fullmatch(p.name).group(2, 6)
            tokens = suffix.split("_")
            speeds[domain].add(dict(zip(tokens[0::2], tokens[1::2]))["speed"])
        assert speeds["source"] and speeds["target"]
        assert not speeds["source"] & speeds["target"]


def test_attributes_csv(corpus):
    root, _ = corpus
    for machine in default_spec().machine_types:
        csv_path = root / machine.name / "attributes_00.csv"
        if not machine.attributes:
            assert not csv_path.exists()
            assert not list((root / machine.name).glob("attributes_*.csv"))
            continue
        rows = list(csv.reader(io.StringIO(csv_path.read_text())))
        header, body = rows[0], rows[1:]
        n_pairs = (len(header) - 1) // 2
        assert header == ["file_name"] + [f"d{i}{s}" for i in range(1, n_pairs + 1) for s in "pv"]
        listed = {row[0] for row in body}
        on_disk = {f"{machine.name}/{p.parent.name}/{p.name}" for p in (root / machine.name).glob("*/*.wav")}
        assert listed == on_disk
        for row in body:
            assert row[0].startswith(f"{machine.name}/")
            suffix = NAME_RE.fullmatch(os.path.basename(row[0])).group(6)
            assert "_".join(row[1:]) == suffix  # speed,1500,load,30 <-> speed_1500_load_30
            assert all("_" not in cell for cell in row[1:])


def test_sections_get_their_own_files(tmp_path):
    info = make_corpus(_tiny_spec(), str(tmp_path), progress=False)
    assert {NAME_RE.fullmatch(os.path.basename(f)).group(1) for f in info.files} == {"00", "01"}
    for machine in default_spec().machine_types:
        present = sorted(p.name for p in (tmp_path / machine.name).glob("attributes_*.csv"))
        assert present == (["attributes_00.csv", "attributes_01.csv"] if machine.attributes else [])


# ----------------------------------------------------------------------------- audio


def test_audio_format(corpus):
    root, _ = corpus
    spec = default_spec()
    for p in _wav_files(root)[::7]:
        meta = sf.info(p)
        assert (meta.samplerate, meta.channels, meta.subtype, meta.format) == (16000, 1, "PCM_16", "WAV")
        assert meta.frames == int(spec.duration_s * spec.sample_rate)
        x, _ = sf.read(p, dtype="int16")
        peak = np.abs(x).max() / 32768
        assert 0.45 <= peak <= 0.85, (p.name, peak)  # normalised, never clipped
        assert np.sqrt(np.mean((x / 32768.0) ** 2)) > 0.02  # not silent


def test_synth_clip_contract():
    machine = MachineSpec("fanlike")
    rng = np.random.default_rng(0)
    x = synth_clip(machine, {"speed": "1500", "load": "30"}, "source", "clicks", rng, 1.0, 16000, 1.0)
    assert x.dtype == np.float32 and x.shape == (16000,)
    assert 0.5 <= np.abs(x).max() <= 0.8
    with pytest.raises(ValueError):
        synth_clip(machine, {"speed": "1500"}, "nowhere", None, rng, 1.0, 16000, 1.0)


# ----------------------------------------------------------------------------- separability


def test_knn_separates_anomalies_but_not_perfectly(corpora, one_torch_thread):
    means = {}
    for strength, (root, _) in corpora.items():
        aucs = _knn_aucs(root)
        means[strength] = (
            np.mean([v for (_, d), v in aucs.items() if d == "source"]),
            np.mean([v for (_, d), v in aucs.items() if d == "target"]),
        )
    overall = {s: np.mean(v) for s, v in means.items()}
    assert 0.65 <= overall[1.0] <= 0.95, means
    assert overall[0.3] < overall[1.0] < overall[3.0], means
    assert overall[3.0] - overall[0.3] > 0.2, means
    assert means[1.0][1] < means[1.0][0], means  # the target domain is harder


@pytest.mark.parametrize("name", ["fanlike", "gearlike"])  # gearlike: hidden attributes
def test_attribute_values_form_clusters(name, one_torch_thread):
    machine = next(m for m in default_spec().machine_types if m.name == name)
    groups = {
        "a": {"speed": str(machine.source_speeds[0]), "load": str(machine.loads[0])},
        "b": {"speed": str(machine.source_speeds[-1]), "load": str(machine.loads[-1])},
        "c": {"speed": str(machine.source_speeds[0]), "load": str(machine.loads[-1])},
    }
    emb = {
        g: np.stack([
            _embed(synth_clip(machine, attrs, "source", None, np.random.default_rng([g.encode()[0], i]),
                              2.0, 16000, 1.0))
            for i in range(6)
        ])
        for g, attrs in groups.items()
    }

    def mean_dist(x, y, same):
        d = 1 - x @ y.T
        return d[~np.eye(len(x), dtype=bool)].mean() if same else d.mean()

    within = np.mean([mean_dist(e, e, True) for e in emb.values()])
    for g1, g2 in [("a", "b"), ("a", "c"), ("b", "c")]:
        assert mean_dist(emb[g1], emb[g2], False) > 2 * within, (g1, g2)


def test_default_spec_accepts_config_values():
    spec = default_spec(sections=["00", "01"], machine_types=[{"name": "x", "loads": [10, 90]}])
    assert spec.sections == ("00", "01")
    assert spec.machine_types == [MachineSpec("x", loads=(10, 90))]
    assert default_spec(seed=3).machine_types == default_spec().machine_types
