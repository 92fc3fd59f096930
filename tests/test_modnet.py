"""The modulation front end and encoder: the spectrum itself, the `mod` feature matrix, the encoder,
its checkpoints, training it through the finetune stage, and the `concat` embedder of the served recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asd.data.frontend import ModulationConfig, compute_modulation
from asd.models.modnet import ModConfig, ModEncoder, RunningStandardize
from asd.models.registry import load_checkpoint, save_checkpoint
from asd.stages.featurize import FeaturizeConfig
from asd.stores.features import matrix_array
from tests.test_cnn import write_section_labels

SR = 16000
SMALL = ModConfig(channels=(8, 16), pooled=4, embed_dim=12)


def _am_noise(hz: float, seconds: float, depth: float = 0.5, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return 0.1 * np.random.default_rng(seed).standard_normal(t.size) * (1 + depth * np.sin(2 * np.pi * hz * t))


@pytest.mark.parametrize("hz", [7.0, 37.0, 160.0])
def test_the_modulation_spectrum_peaks_at_the_rate_the_band_energy_fluctuates(hz):
    cfg = ModulationConfig()
    m = compute_modulation(_am_noise(hz, 4.0), SR, cfg)
    assert m.shape == (cfg.bins, cfg.bands) and m.dtype == np.float32
    width = cfg.max_hz / cfg.bins
    peak = int(np.argmax(m.mean(axis=1)))
    assert abs((peak + 0.5) * width - hz) <= width, (peak, hz)
    flat = compute_modulation(_am_noise(hz, 4.0, depth=0.0), SR, cfg)  # the same noise, not modulated
    assert m.mean(axis=1)[peak] > flat.mean(axis=1)[peak] + 1.0


def test_the_modulation_spectrum_has_one_shape_for_any_length_and_checks_its_settings():
    cfg = ModulationConfig()
    for seconds in (0.005, 0.3, 2.0, 10.0):  # shorter than one STFT window, to a DCASE clip
        m = compute_modulation(_am_noise(20.0, seconds), SR, cfg)
        assert m.shape == (256, 16) and np.isfinite(m).all()
    cfg.check(SR)
    with pytest.raises(ValueError, match="max_hz"):
        ModulationConfig(max_hz=300.0).check(SR)  # above half the 500 Hz envelope rate
    with pytest.raises(ValueError, match="multiple of 16"):
        ModulationConfig(bins=100).check(SR)
    with pytest.raises(ValueError, match="fmax_hz"):
        ModulationConfig(fmax_hz=9000.0).check(SR)


def test_a_log_mel_only_root_keeps_its_config_hash():
    from asd.data.frontend import SpectrumConfig

    on = FeaturizeConfig(spectrum=SpectrumConfig(enabled=False))
    off = FeaturizeConfig(modulation=ModulationConfig(enabled=False), spectrum=SpectrumConfig(enabled=False))
    assert on.config_hash() != off.config_hash()
    import hashlib
    import json
    from dataclasses import asdict

    fbank = {k: v for k, v in asdict(off.fbank).items() if k != "kind"}  # before the librosa front end
    old = hashlib.sha256(json.dumps(fbank, sort_keys=True).encode()).hexdigest()[:12]
    assert off.config_hash() == old  # roots featurized before the modulation front end existed still match


def test_running_standardize_learns_its_training_statistics_and_keeps_them_in_eval():
    torch.manual_seed(0)
    norm = RunningStandardize((5, 3))
    data = torch.randn(400, 5, 3) * 4.0 + torch.arange(15.0).reshape(5, 3)
    norm.train()
    for chunk in data.split(32):
        norm(chunk)
    assert torch.allclose(norm.mean, data.mean(0), atol=1e-4)
    norm.eval()
    out = norm(data)
    assert abs(float(out.mean())) < 1e-3 and abs(float(out.std()) - 1.0) < 0.02
    before = norm.mean.clone()
    norm(data + 100.0)  # eval: statistics stay as trained
    assert torch.equal(norm.mean, before)


def test_the_mod_encoder_embeds_whole_spectra_and_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    enc = ModEncoder(SMALL)
    assert enc.min_frames == 256 and enc.input == "mod"
    enc.train()
    enc(torch.randn(8, 256, 16))  # move the statistics off their defaults
    enc.eval()
    x = torch.randn(3, 256, 16)
    assert enc.embed(x).shape == (3, 12)
    with pytest.raises(ValueError, match="expected modulation spectra"):
        enc(torch.randn(3, 192, 16))
    with pytest.raises(ValueError, match="one embedding"):
        enc.embed(x, layer=1)
    uri = save_checkpoint(enc, str(tmp_path / "mod.pt"), meta={"stage": "finetune"})
    assert torch.load(uri, weights_only=True)["arch"] == "mod"
    back = load_checkpoint(uri)
    assert isinstance(back, ModEncoder) and back.cfg == SMALL and torch.allclose(back.embed(x), enc.embed(x))
    assert torch.equal(back.standardize.mean, enc.standardize.mean)
    with pytest.raises(ValueError, match="kernel"):
        ModConfig(kernel=4)
    with pytest.raises(ValueError, match="nothing of"):
        ModConfig(bins=16, channels=(4, 4, 4, 4, 4))


def test_the_concat_embedder_reads_both_matrices_and_weighs_its_members_alike(tmp_path):
    from asd.models.cnn import CNNConfig, CNNEncoder
    from asd.models.embedders import embedder_inputs, make_embedder

    torch.manual_seed(0)
    cnn_uri = save_checkpoint(CNNEncoder(CNNConfig(channels=(4, 4, 8), embed_dim=16)).eval(), str(tmp_path / "c.pt"))
    mod_uri = save_checkpoint(ModEncoder(SMALL).eval(), str(tmp_path / "m.pt"))
    members = [{"embedder": "encoder", "params": {"checkpoint": cnn_uri, "device": "cpu"}},
               {"embedder": "encoder", "params": {"checkpoint": mod_uri, "device": "cpu"}}]
    assert embedder_inputs("encoder", {"checkpoint": mod_uri}) == ("mod",)
    assert embedder_inputs("concat", {"members": members}) == ("fbank", "mod")
    assert embedder_inputs("logmel_stats") == ("fbank",)
    emb = make_embedder("concat", {"members": members})
    rng = np.random.default_rng(0)
    fb = [rng.normal(0, 1, (n, 128)).astype(np.float32) for n in (50, 80)]
    mod = [rng.normal(0, 1, (256, 16)).astype(np.float32) for _ in range(2)]
    out = emb(fb, mod)
    assert out.shape == (2, 28) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # each member's part has norm 1/sqrt(2): neither outweighs the other in a cosine
    assert np.allclose(np.linalg.norm(out[:, :16], axis=1), 2 ** -0.5, atol=1e-5)
    with pytest.raises(ValueError, match="at least one member"):
        make_embedder("concat", {"members": []})


def test_a_row_without_the_modulation_matrix_is_refused_by_name():
    row = {"clip_id": "fan/x", "mod": None, "mod_dtype": None, "mod_bins": None, "mod_bands": None}
    with pytest.raises(ValueError, match="'fan/x' has no 'mod' features"):
        matrix_array(row, "mod")


@pytest.mark.slow
def test_the_mod_encoder_trains_through_the_finetune_stage_and_embeds_side_by_side(small_corpus, ray_session,
                                                                                     tmp_path):
    from asd.stages.embed import EmbedConfig, embed
    from asd.stages.featurize import featurize
    from asd.stages.finetune import FinetuneConfig, finetune
    from asd.stores.embeddings import read_embeddings, vectors
    from asd.stores.features import read_features_table
    from asd.training.loop import TrainConfig

    root = str(tmp_path / "on")
    featurize(small_corpus, root, FeaturizeConfig(progress=False))
    t = read_features_table(root, columns=["clip_id", "machine_type", "section", "domain", "split", "mod_bins",
                                           "mod_bands", "mod_dtype"])
    assert set(t.column("mod_bins").to_pylist()) == {256} and set(t.column("mod_bands").to_pylist()) == {16}
    labels = write_section_labels(root)
    fcfg = FinetuneConfig(tag="mod", model="mod", model_cfg={"channels": [8, 16, 16], "pooled": 8, "embed_dim": 16},
                          labels=labels, mixup_prob=0.0, time_masks=0, freq_masks=0, statex_prob=0.5)  # as served
    tcfg = TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup_steps=4, crop_frames=256, log_every=5,
                       num_workers=1, cpus_per_worker=1.0, checkpoint_every=20, bf16=False)
    with pytest.raises(ValueError, match="crop_frames must be 256"):
        finetune(root, root, fcfg, TrainConfig(crop_frames=192))
    res = finetune(root, root, fcfg, tcfg)
    assert res.steps == 40 and res.num_classes == 4
    assert res.final_accuracy > max(0.5, res.first_accuracy), (res.first_accuracy, res.final_accuracy)
    enc = load_checkpoint(res.encoder)
    assert isinstance(enc, ModEncoder) and float(enc.standardize.count) > 0
    assert (enc.meta["norm_mean"], enc.meta["norm_std"]) == (0.0, 0.5)  # the model normalises its own input
    params = {"checkpoint": res.encoder, "device": "cpu"}
    members = [{"embedder": "logmel_stats", "params": {}}, {"embedder": "encoder", "params": params}]
    out = embed(root, "fused", EmbedConfig(embedder="concat", params={"members": members}, num_actors=1,
                                           num_cpus=0.5, progress=False))
    e = read_embeddings(out.embeddings)
    assert e.num_rows == t.num_rows and out.dim == 256 + 16
    assert np.allclose(np.linalg.norm(vectors(e), axis=1), 1.0, atol=1e-4)
    # features made without the modulation front end: training on them names what is missing
    off = str(tmp_path / "off")
    featurize(small_corpus, off, FeaturizeConfig(progress=False, modulation=ModulationConfig(enabled=False)))
    assert set(read_features_table(off, columns=["mod"]).column("mod").to_pylist()) == {None}
    with pytest.raises(ValueError, match="no training rows with 'mod' features"):
        finetune(off, off, FinetuneConfig(tag="mod", model="mod", labels=labels, time_masks=0, freq_masks=0),
                 TrainConfig(crop_frames=256, steps=2, num_workers=1))


def test_the_concat_embedder_weights_members_and_keeps_blocks_for_score_fusion(tmp_path):
    from asd.models.cnn import CNNConfig, CNNEncoder
    from asd.models.embedders import embedder_blocks, make_embedder

    torch.manual_seed(0)
    cnn_uri = save_checkpoint(CNNEncoder(CNNConfig(channels=(4, 4, 8), embed_dim=16)).eval(), str(tmp_path / "c.pt"))
    mod_uri = save_checkpoint(ModEncoder(SMALL).eval(), str(tmp_path / "m.pt"))
    members = [{"embedder": "encoder", "params": {"checkpoint": cnn_uri, "device": "cpu"}, "weight": 3.0},
               {"embedder": "encoder", "params": {"checkpoint": mod_uri, "device": "cpu"}, "weight": 1.0}]
    rng = np.random.default_rng(1)
    fb = [rng.normal(0, 1, (n, 128)).astype(np.float32) for n in (50, 80)]
    mod = [rng.normal(0, 1, (256, 16)).astype(np.float32) for _ in range(2)]
    # embedding fusion: part norms are sqrt(w / sum w), so a cosine is the weighted mean of the members'
    out = make_embedder("concat", {"members": members})(fb, mod)
    assert np.allclose(np.linalg.norm(out[:, :16], axis=1), 0.75 ** 0.5, atol=1e-5)
    assert embedder_blocks("concat", {"members": members}) is None
    # score fusion: unit-norm blocks and their widths and weights, known on the driver
    blocks = embedder_blocks("concat", {"members": members, "fusion": "score"})
    assert blocks == [{"dim": 16, "weight": 3.0}, {"dim": SMALL.embed_dim, "weight": 1.0}]
    out = make_embedder("concat", {"members": members, "fusion": "score"})(fb, mod)
    assert out.shape == (2, 16 + SMALL.embed_dim)
    assert np.allclose(np.linalg.norm(out[:, :16], axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(out[:, 16:], axis=1), 1.0, atol=1e-5)
    assert embedder_blocks("logmel_stats") is None
    with pytest.raises(ValueError, match="cannot state its width"):  # its width depends on the features
        embedder_blocks("concat", {"members": [{"embedder": "logmel_stats"}], "fusion": "score"})
    with pytest.raises(ValueError, match="fusion"):
        make_embedder("concat", {"members": members, "fusion": "vote"})
    with pytest.raises(ValueError, match="positive"):
        embedder_blocks("concat", {"members": [{**members[0], "weight": 0}], "fusion": "score"})
