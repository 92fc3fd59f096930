"""The long-term power spectrum: the front end, its feature matrix, the training-free `spectrum`
embedder and the recipe source that scores it."""

from __future__ import annotations

import numpy as np
import pytest

from asd.data.frontend import ModulationConfig, SpectrumConfig, compute_spectrum
from asd.models.embedders import FEATURE_EMBEDDERS, make_embedder
from asd.recipes.recipe import EmbedEntry, Recipe, members, source_member
from asd.stages.featurize import FeaturizeConfig
from asd.stores.features import matrix_array, matrix_columns

SR = 16000


def _tones(hz: list[float], seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(0.3 * np.sin(2 * np.pi * f * t) for f in hz)
    return x + 0.001 * np.random.default_rng(seed).standard_normal(t.size)


@pytest.mark.parametrize("hz", [130.0, 1000.0, 6250.0])
def test_the_spectrum_peaks_at_the_tone_within_one_bin(hz):
    cfg = SpectrumConfig()
    s = compute_spectrum(_tones([hz]), SR, cfg)
    assert s.shape == (cfg.n_fft // 2 + 1, 1) and s.dtype == np.float32
    width = SR / cfg.n_fft  # about 3.9 Hz
    assert abs(int(np.argmax(s[:, 0])) * width - hz) <= width
    # two tones 20 Hz apart stay two peaks (a 128-band mel frame, some 60 Hz wide there, merges them)
    two = compute_spectrum(_tones([1000.0, 1020.0]), SR, cfg)[:, 0]
    a, b = round(1000 / width), round(1020 / width)
    assert two[a] > two[(a + b) // 2] + 1.0 and two[b] > two[(a + b) // 2] + 1.0


def test_the_spectrum_starts_at_fmin_has_one_shape_for_any_length_and_checks_its_settings():
    cfg = SpectrumConfig(fmin_hz=250.0)
    for seconds in (0.01, 0.3, 12.0):  # shorter than one segment, to a ToyCar clip
        s = compute_spectrum(_tones([1000.0], seconds), SR, cfg)
        assert s.shape == (cfg.bins(SR), 1) and np.isfinite(s).all()
    full = compute_spectrum(_tones([1000.0]), SR, SpectrumConfig())
    assert np.allclose(full[-cfg.bins(SR):], compute_spectrum(_tones([1000.0]), SR, cfg))
    with pytest.raises(ValueError, match="power of two"):
        SpectrumConfig(n_fft=1000).check(SR)
    with pytest.raises(ValueError, match="fmin_hz"):
        SpectrumConfig(fmin_hz=8000.0).check(SR)


def test_the_spectrum_enters_the_featurize_hash_and_a_log_mel_only_root_keeps_its_hash():
    import hashlib
    import json
    from dataclasses import asdict

    both_off = FeaturizeConfig(modulation=ModulationConfig(enabled=False), spectrum=SpectrumConfig(enabled=False))
    fbank = {k: v for k, v in asdict(both_off.fbank).items() if k != "kind"}  # before the librosa front end
    old = hashlib.sha256(json.dumps(fbank, sort_keys=True).encode()).hexdigest()[:12]
    assert both_off.config_hash() == old  # roots featurized before either front end existed still match
    assert FeaturizeConfig().config_hash() != FeaturizeConfig(spectrum=SpectrumConfig(n_fft=2048)).config_hash()
    assert matrix_columns("spec") == ["spec", "spec_dtype", "spec_bins"]


def test_a_spectrum_row_reads_back_and_a_row_without_one_is_refused_by_name():
    s = compute_spectrum(_tones([500.0]), SR, SpectrumConfig()).astype(np.float16)
    row = {"clip_id": "ToyCar/a", "spec": s.tobytes(), "spec_dtype": "float16", "spec_bins": s.shape[0]}
    assert np.array_equal(matrix_array(row, "spec"), s.astype(np.float32))
    with pytest.raises(ValueError, match="'ToyCar/b' has no 'spec' features.*spectrum.enabled=false"):
        matrix_array({"clip_id": "ToyCar/b", "spec": None, "spec_dtype": None, "spec_bins": None}, "spec")


def test_the_spectrum_embedder_puts_a_clip_nearest_the_clip_of_the_same_harmonics():
    cfg = SpectrumConfig()
    clips = [compute_spectrum(_tones(hz, seed=i), SR, cfg) for i, hz in
             enumerate([[200, 400, 600], [200, 400, 600], [210, 420, 630]])]
    emb = make_embedder("spectrum")(clips)
    assert emb.shape == (3, cfg.n_fft // 2 + 1)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # the same machine, not one whose harmonics moved by 5 %
    assert "spectrum" in FEATURE_EMBEDDERS


def test_a_recipe_scores_the_spectrum_alone_or_fused_with_its_models():
    assert source_member("spectrum", weight=0.5) == {"embedder": "spectrum", "params": {}, "weight": 0.5}
    r = Recipe(name="spectrum", embed=[EmbedEntry(source="spectrum")])
    assert members(r, {}, None) == [{"embedder": "spectrum", "params": {}, "weight": 1.0}]
    with pytest.raises(ValueError, match="neither logmel, spectrum, pretrained nor one of its models"):
        Recipe(name="x", embed=[EmbedEntry(source="spectra")])
