"""The official DCASE autoencoder baseline (asd.baselines.autoencoder): its parts without Ray, and
one small end-to-end run on Ray Train (front end, training, both scores, published models)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from sklearn.metrics import roc_auc_score

from asd.baselines.autoencoder import featurize_frontend, load_autoencoders, run_baseline
from asd.baselines.autoencoder.model import (
    AEBank,
    AEConfig,
    AENet,
    AutoencoderObjective,
    TypeModel,
    clip_vectors,
    context_vectors,
    default_train_config,
    inverse_covariance,
    mahalanobis_term,
)
from asd.io import layout, storage
from asd.stages.featurize import FeaturizeConfig
from asd.stages.score import SCORE_SCHEMA
from asd.stores.features import read_features_table

# ----------------------------------------------------------------------------- parts, no Ray


def test_context_vectors_are_consecutive_frames_in_order():
    x = torch.arange(2 * 9 * 3, dtype=torch.float32).reshape(2, 9, 3)  # (B, T, F)
    v = context_vectors(x, frames=5)
    assert v.shape == (2, 5, 15)
    assert torch.equal(v[1, 2], x[1, 2:7].reshape(-1))  # frame after frame, as file_to_vectors
    assert np.array_equal(clip_vectors(x[1].numpy(), 5), v[1].numpy())
    assert clip_vectors(x[0, :3].numpy(), 5).shape == (1, 15)  # a too-short clip is tiled
    with pytest.raises(ValueError, match="fewer than"):
        context_vectors(x[:, :4], frames=5)


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


def test_each_type_gets_only_the_gradient_of_its_own_mse():
    torch.manual_seed(0)
    cfg = AEConfig(n_mels=8, hidden=16, bottleneck=4)
    obj = AutoencoderObjective(cfg, ["a", "b"], {"a": 1.0, "b": -2.0})
    bank = obj.build()
    batch = {"fbank": torch.randn(5, 16, 8), "machine_type": ["a", "b", "a", "a", "b"]}
    loss, _ = obj.step(bank, batch, 0)
    loss.backward()
    got = [p.grad.clone() for p in bank.nets["0"].parameters()]
    bank.zero_grad()
    alone = AutoencoderObjective(cfg, ["a"], {"a": 1.0})  # type a trained alone on its own clips
    only_a = {"fbank": batch["fbank"][[0, 2, 3]], "machine_type": ["a"] * 3}
    solo = AEBank(cfg, ["a"])
    solo.load_state_dict({k: v for k, v in bank.state_dict().items() if k.startswith("nets.0.")})
    alone.step(solo, only_a, 0)[0].backward()
    for g, p in zip(got, solo.nets["0"].parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    with pytest.raises(ValueError, match="mel bins"):
        obj.step(bank, {"fbank": torch.randn(2, 16, 9), "machine_type": ["a", "b"]}, 0)
    with pytest.raises(ValueError, match="no autoencoder"):
        obj.step(bank, {"fbank": torch.randn(1, 16, 8), "machine_type": ["c"]}, 0)


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


# ----------------------------------------------------------------------------- on Ray Train


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
    tcfg = default_train_config(steps=150, log_every=10, checkpoint_every=150)
    res = run_baseline(ae_corpus, root, AEConfig(num_actors=1), tcfg, FeaturizeConfig(progress=False), plots=False)
    return root, res


def test_training_loss_falls_and_models_are_published(baseline):
    root, res = baseline
    tr = res.train["training"]
    losses = [loss for _, loss in tr["loss_history"]]
    assert tr["steps"] == 150 and len(losses) == 15
    assert losses[-1] < 0.5 * losses[0], losses
    models = storage.join(root, "models", "ae")
    assert res.train["models"] == models and storage.is_published(models)
    assert storage.exists(storage.join(root, "checkpoints", "ae", "step-00000150"))
    config = storage.read_json(storage.join(models, "config.json"))
    assert config["frontend"]["frame_length_ms"] == 64.0 and config["frontend"]["num_mel_bins"] == 128
    info = config["machine_types"]["fanlike"]
    assert (info["train_clips_source"], info["train_clips_target"]) == (12, 4)
    assert info["target_covariance"] == "target" and info["bn_recalibration_vectors"] > 0
    assert all(np.isfinite(v) for v in info["thresholds"].values())
    # the front end is a second feature set: 64 ms / 32 ms frames, float32
    feats = read_features_table(layout.ae_root(root), columns=["fbank_frames", "num_mel_bins", "fbank_dtype"])
    assert set(feats.column("num_mel_bins").to_pylist()) == {128}
    assert set(feats.column("fbank_dtype").to_pylist()) == {"float32"}
    assert set(feats.column("fbank_frames").to_pylist()) == {(32000 - 1024) // 512 + 1}
    with pytest.raises(ValueError, match="other filterbank settings"):
        featurize_frontend("unused", root, AEConfig(frame_shift_ms=16.0))


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
