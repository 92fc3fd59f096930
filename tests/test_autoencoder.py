"""The official DCASE autoencoder baseline (asd.baselines.autoencoder): its parts without Ray, and
one small end-to-end run on Ray Train (front end, training, both scores, published models)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from sklearn.metrics import roc_auc_score

from asd.baselines.autoencoder import (
    featurize_frontend,
    load_autoencoders,
    run_baseline,
)
from asd.baselines.autoencoder.model import (
    AEConfig,
    AENet,
    TypeModel,
    clip_vectors,
    inverse_covariance,
    mahalanobis_term,
    train_type,
)
from asd.data.frontend import FbankConfig, compute_fbank
from asd.io import layout, storage
from asd.stages.featurize import FeaturizeConfig
from asd.stages.score import SCORE_SCHEMA
from asd.stores.features import read_features_table

# ----------------------------------------------------------------------------- parts, no Ray


def _librosa_mel_db(y: np.ndarray, sr: int = 16000, n_fft: int = 1024, hop: int = 512, n_mels: int = 128):
    """librosa 0.9.2's ``melspectrogram(power=2)`` then ``10 log10(max(., eps))``, written out in numpy
    from its algorithm (reflect-padded centred frames, periodic Hann, Slaney mel filters with Slaney
    normalisation): an independent reference for the front end."""
    y = np.pad(np.asarray(y, np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([y[i * hop:i * hop + n_fft] * window for i in range(1 + (len(y) - n_fft) // hop)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2

    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def hz_to_mel(f):
        f = np.asarray(f, np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    ramps = pts[:, None] - np.linspace(0, sr / 2, 1 + n_fft // 2)[None, :]
    fdiff = np.diff(pts)
    weights = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    weights *= (2.0 / (pts[2:] - pts[:-2]))[:, None]
    return 10 * np.log10(np.maximum(power @ weights.T, np.finfo(np.float64).eps))


def test_the_front_end_is_librosas_mel_spectrogram_in_db():
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    y = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    ours = compute_fbank(y, AEConfig().fbank())
    ref = _librosa_mel_db(y)
    assert ours.shape == ref.shape == (1 + 32000 // 512, 128)  # centred frames: 63, not Kaldi's 61
    assert np.max(np.abs(ours - ref)) < 1e-2  # dB; float32 against float64
    assert AEConfig().fbank().kind == "librosa" and FbankConfig().kind == "kaldi"
    with pytest.raises(ValueError, match="fbank.kind"):
        compute_fbank(y, FbankConfig(kind="mfcc"))


def test_context_vectors_are_consecutive_frames_in_order():
    x = np.arange(9 * 3, dtype=np.float32).reshape(9, 3)  # (T, F)
    v = clip_vectors(x, 5)
    assert v.shape == (5, 15)
    assert np.array_equal(v[2], x[2:7].reshape(-1))  # frame after frame, as file_to_vectors
    assert clip_vectors(x[:3], 5).shape == (1, 15)  # a too-short clip is tiled


def test_training_is_the_published_one_epochs_over_every_vector_with_a_held_out_tenth():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((1, 8)).astype(np.float32) * 3
    clips = [base + 0.3 * rng.standard_normal((40, 8)).astype(np.float32) for _ in range(10)]
    cfg = AEConfig(n_mels=8, hidden=16, bottleneck=4, epochs=6, batch_size=32, seed=7, lr=1e-2)
    net, info = train_type(clips, cfg)
    vectors = 10 * (40 - 5 + 1)
    assert info["validation_vectors"] == int(vectors * 0.1) and info["train_vectors"] == vectors - int(vectors * 0.1)
    assert info["epochs"] == 6 and len(info["loss_history"]) == 6 and info["steps"] == 6 * -(-info["train_vectors"] // 32)
    assert info["final_loss"] < 0.5 * info["first_loss"] and info["final_val_loss"] is not None
    again, info2 = train_type(clips, cfg)  # the seed fixes the split, the order and the initial weights
    assert info2["loss_history"] == info["loss_history"]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="epochs"):
        AEConfig(epochs=0)


def test_network_is_the_published_architecture():
    net = AENet(AEConfig())
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (640, 128), (128, 128), (128, 128), (128, 128), (128, 8),
        (8, 128), (128, 128), (128, 128), (128, 128), (128, 640)]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bns) == 9 and all(b.momentum == 0.01 and b.eps == 1e-3 for b in bns)
    assert net(torch.randn(7, 640)).shape == (7, 640)
    with pytest.raises(ValueError, match="maha_reduction"):
        AEConfig(maha_reduction="median")


def test_selective_mahalanobis_takes_the_nearer_domain():
    rng = np.random.default_rng(0)
    a = np.diag([4.0, 0.01])  # source errors vary along axis 0, target errors along axis 1
    b = np.diag([0.01, 4.0])
    src = rng.standard_normal((4000, 2)) @ np.sqrt(a)
    tgt = rng.standard_normal((4000, 2)) @ np.sqrt(b)
    p_src, p_tgt = inverse_covariance(np.cov(src.T), 0.0), inverse_covariance(np.cov(tgt.T), 0.0)
    clip = np.tile([[0.0, 1.5]], (10, 1))  # a target-like error
    assert mahalanobis_term(clip, p_tgt) < 1.0
    assert mahalanobis_term(clip, p_src) > 100.0
    # mean_error (the official reduction) = dbar^T P dbar; mean_distance = mean of d_i^T P d_i
    rows = rng.standard_normal((6, 2))
    d = rows.mean(axis=0)
    assert mahalanobis_term(rows, p_src, "mean_error") == pytest.approx(d @ p_src @ d)
    assert mahalanobis_term(rows, p_src, "mean_distance") == pytest.approx(
        np.mean([r @ p_src @ r for r in rows]))


# ----------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ae_corpus(tmp_path_factory):
    """One machine type, both domains, strong anomalies: the baseline must separate them."""
    from asd.data.synthetic import MachineSpec, default_spec, make_corpus

    root = tmp_path_factory.mktemp("ae_corpus")
    spec = default_spec(machine_types=[MachineSpec("fanlike")], n_train_source=12, n_train_target=4,
                        n_test_per_domain=10, duration_s=2.0, anomaly_strength=3.0, seed=3)
    make_corpus(spec, str(root), workers=1, progress=False)
    return str(root)


@pytest.fixture(scope="module")
def baseline(ae_corpus, ray_session, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ae_run"))
    res = run_baseline(ae_corpus, root, AEConfig(num_actors=1), FeaturizeConfig(progress=False), plots=False)  # 100 epochs
    return root, res


def test_training_loss_falls_and_models_are_published(baseline):
    root, res = baseline
    models = storage.join(root, "models", "ae")
    assert res.train["models"] == models and storage.is_published(models)
    config = storage.read_json(storage.join(models, "config.json"))
    assert config["frontend"]["kind"] == "librosa" and config["frontend"]["frame_length_ms"] == 64.0
    assert config["frontend"]["num_mel_bins"] == 128 and config["ae"]["epochs"] == 100
    info = config["machine_types"]["fanlike"]
    assert (info["train_clips_source"], info["train_clips_target"]) == (12, 4)
    vectors = 16 * (63 - 5 + 1)  # every context vector of the 16 training clips of 63 frames
    assert info["train_vectors"] + info["validation_vectors"] == vectors and info["validation_vectors"] == vectors // 10
    losses = [loss for _, loss, _ in info["loss_history"]]
    assert len(losses) == 100 and losses[-1] < 0.5 * losses[0], losses
    assert info["target_covariance"] == "target" and all(np.isfinite(v) for v in info["thresholds"].values())
    # the front end is a second feature set: 64 ms / 32 ms centred frames, float32, in dB
    feats = read_features_table(layout.ae_root(root), columns=["fbank_frames", "num_mel_bins", "fbank_dtype"])
    assert set(feats.column("num_mel_bins").to_pylist()) == {128}
    assert set(feats.column("fbank_dtype").to_pylist()) == {"float32"}
    assert set(feats.column("fbank_frames").to_pylist()) == {1 + 32000 // 512}
    with pytest.raises(ValueError, match="other front-end settings"):
        featurize_frontend("unused", root, AEConfig(hop_length=256))


def test_mahalanobis_covariances_are_per_domain(baseline):
    """The published covariances equal those recomputed from the source and from the target
    training clips' reconstruction errors alone, and differ from each other."""
    root, _ = baseline
    models_uri = storage.join(root, "models", "ae")
    model: TypeModel = load_autoencoders(models_uri)["fanlike"]
    maha = np.load(io.BytesIO(storage.read_bytes(storage.join(models_uri, "fanlike", "mahalanobis.npz"))))
    rows = read_features_table(layout.ae_root(root))
    rows = rows.filter(pc.equal(rows.column("split"), "train"))
    for domain in ("source", "target"):
        part = rows.filter(pc.equal(rows.column("domain"), domain))
        errors = np.concatenate([model.errors(np.frombuffer(r["fbank"], np.float32).reshape(r["fbank_frames"], -1))
                                 for r in part.to_pylist()])
        assert np.allclose(maha[f"cov_{domain}"], np.cov(errors.T), rtol=1e-4, atol=1e-6)
        assert np.allclose(maha[f"inv_cov_{domain}"] @ maha[f"cov_{domain}"], np.eye(128), atol=1e-3)
    assert not np.allclose(maha["cov_source"], maha["cov_target"], rtol=0.05)


def test_both_scores_rank_anomalies_above_normals(baseline):
    _, res = baseline
    for name in ("ae_mse", "ae_mahalanobis"):
        out = res.scores[name]
        assert out["n_scored"] == 20 and storage.is_published(out["scores"])
        table = storage.read_table(storage.join(out["scores"], "scores.parquet"))
        assert table.schema == SCORE_SCHEMA
        rows = table.to_pylist()
        y = [r["label"] == "anomaly" for r in rows]
        auc = roc_auc_score(y, [r["score"] for r in rows])
        # the official Mahalanobis reduction (the clip's mean error) separates less than the MSE
        assert auc > {"ae_mse": 0.75, "ae_mahalanobis": 0.6}[name], (name, auc)
        assert out["official_score"] > 0.55, (name, out["official_score"])
        assert storage.exists(storage.join(out["scores"], "anomaly_score_fanlike_section_00_test.csv"))
        if name == "ae_mahalanobis":  # the score is the smaller of the two domains' terms
            assert all(r["score"] == pytest.approx(min(r["score_source"], r["score_target"]), rel=1e-5) for r in rows)
