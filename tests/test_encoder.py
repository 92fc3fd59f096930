"""Tests for asd.models.encoder: shapes, masking, padding, BEATs names, checkpoints."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from asd.io import storage
from asd.models.encoder import (
    CONFIGS,
    AudioEncoder,
    EncoderConfig,
    WeightNormConv1d,
    beats_config_from,
    beats_state_dict_from,
    get_config,
    normalize_fbank,
    pooled_dim,
)
from asd.models.registry import load_checkpoint, save_checkpoint

# tiny with everything BEATs has switched on (relative bias, gates, DeepNorm)
TINY_BEATS = dataclasses.replace(CONFIGS["tiny"], relative_position_embedding=True, gru_rel_pos=True,
                                 num_buckets=32, max_distance=64)


def fbank(batch=2, frames=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 128, generator=g)


def model(cfg="tiny", seed=0) -> AudioEncoder:
    torch.manual_seed(seed)
    return AudioEncoder(cfg).eval()


# ---------------------------------------------------------------------------- shapes


def test_tiny_forward_backward_shapes():
    m = model().train()
    x = fbank(2, 160)  # 10 time patches x 8 freq patches
    out = m(x)
    assert out.shape == (2, 80, 128)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_patchify_crops_time_to_multiple_of_16():
    m = model()
    feats, grid = m.patchify(fbank(2, 170))
    assert grid == (10, 8) and feats.shape == (2, 80, m.cfg.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(m(fbank(2, 170)), m(fbank(2, 170)[:, :160]))
    with pytest.raises(ValueError, match="mel bins"):
        m(torch.randn(1, 160, 64))
    with pytest.raises(ValueError, match="fewer than one patch"):
        m(torch.randn(1, 15, 128))


def test_patch_order_is_time_major():
    m = model()
    x = torch.zeros(1, 32, 128)
    x[0, 16:32, 16:32] = 5.0  # time patch 1, freq patch 1 -> index 1 * 8 + 1
    with torch.no_grad():
        raw = m.patch_embedding(x.unsqueeze(1)).flatten(2).transpose(1, 2)
        ref = m.patch_embedding(torch.zeros(1, 1, 16, 16))[0, :, 0, 0]
    changed = [i for i in range(16) if not torch.allclose(raw[0, i], ref)]
    assert changed == [9]


def test_mask_drops_patches_and_validates():
    m = model()
    x = fbank(3, 160)
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(3, 80, dtype=torch.bool)
    for row in range(3):
        mask[row, torch.randperm(80, generator=g)[:60]] = True
    with torch.no_grad():
        assert m(x, mask=mask).shape == (3, 20, 128)
        torch.testing.assert_close(m(x, mask=torch.zeros(3, 80, dtype=torch.bool)), m(x))
    uneven = mask.clone()
    uneven[0, ~mask[0]] = True
    with pytest.raises(ValueError, match="same number"):
        m(x, mask=uneven)
    with pytest.raises(ValueError, match="mask must be"):
        m(x, mask=mask[:, :40])


def test_masked_forward_keeps_original_positions():
    m = model(TINY_BEATS)
    mask = torch.ones(2, 80, dtype=torch.bool)
    mask[0, [3, 17, 40, 79]] = False
    mask[1, [0, 1, 60, 70]] = False
    keep = m.kept_index(mask, 80)
    assert keep.tolist() == [[3, 17, 40, 79], [0, 1, 60, 70]]
    attn = m.encoder.layers[0].self_attn
    with torch.no_grad():
        full = attn.position_bias(torch.arange(80)[None])[0]  # (H, N, N)
        for row in range(2):
            k = keep[row]
            torch.testing.assert_close(attn.position_bias(keep)[row], full[:, k][:, :, k])
        assert m(fbank(2, 160), mask=mask).shape == (2, 4, 128)


def test_layers_and_all_layers():
    m = model()
    x = fbank(2, 64)
    with torch.no_grad():
        outs = m(x, return_all_layers=True)
        assert len(outs) == m.cfg.encoder_layers
        torch.testing.assert_close(outs[-1], m(x))
        torch.testing.assert_close(outs[0], m(x, layer=0))
        torch.testing.assert_close(m(x, layer=-1), m(x))
    with pytest.raises(ValueError, match="layer"):
        m(x, layer=2)


def test_embed_pooling_modes():
    m = model()
    x = fbank(4, 96)
    with torch.no_grad():
        tokens = m(x)
        torch.testing.assert_close(m.embed(x), tokens.mean(1))
        torch.testing.assert_close(m.embed(x, pool="max"), tokens.amax(1))
        assert m.embed(x, pool="meanmax").shape == (4, 256)
        assert m.embed(x, layer=0).shape == (4, 128)
    with pytest.raises(ValueError, match="pool"):
        m.embed(x, pool="median")


def test_frequency_band_pooling_keeps_the_spectral_layout():
    m = model()
    x = fbank(3, 96)  # 6 time x 8 frequency patches
    with torch.no_grad():
        tokens = m(x).view(3, 6, 8, 128)  # patches are time-major
        fm = m.embed(x, pool="freq_mean")
        fms = m.embed(x, pool="freq_meanstd")
    assert fm.shape == (3, pooled_dim(m.cfg, "freq_mean")) == (3, 8 * 128)
    assert fms.shape == (3, pooled_dim(m.cfg, "freq_meanstd")) == (3, 2 * 8 * 128)
    torch.testing.assert_close(fm, tokens.mean(1).flatten(1))
    torch.testing.assert_close(fms[:, 1024:], tokens.std(1, unbiased=False).flatten(1))
    # each frequency band has its own slot (bands differ, so the slots do)
    assert not torch.allclose(fm[:, :128], fm[:, 128:256])
    # padded frames do not count: a clip padded to 96 frames pools like the 48-frame clip alone
    short = x[:1, :48]
    padded = torch.cat([short, torch.zeros(1, 48, 128)], dim=1)
    pad = torch.zeros(1, 96, dtype=torch.bool)
    pad[:, 48:] = True
    with torch.no_grad():
        alone = m.embed(short, pool="freq_meanstd")
        masked = m.embed(padded, pool="freq_meanstd", padding_mask=pad)
    torch.testing.assert_close(masked, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", ["tiny", TINY_BEATS], ids=["tiny", "tiny-relpos"])
def test_padding_mask_matches_unpadded_clip(cfg):
    m = model(cfg)
    clip = fbank(1, 160, seed=3)
    padded = torch.cat([clip, 7.0 * torch.randn(1, 160, 128)], dim=1)  # garbage tail
    pad = torch.zeros(1, 320, dtype=torch.bool)
    pad[:, 160:] = True
    with torch.no_grad():
        for pool in ("mean", "max"):
            torch.testing.assert_close(m.embed(padded, pool=pool, padding_mask=pad), m.embed(clip, pool=pool),
                                       atol=1e-5, rtol=1e-4)
        assert m(padded, padding_mask=pad).shape == (1, 160, 128)


def test_fully_padded_clip_stays_finite():
    m = model(TINY_BEATS)
    pad = torch.zeros(2, 64, dtype=torch.bool)
    pad[1] = True
    with torch.no_grad():
        assert torch.isfinite(m.embed(fbank(2, 64), padding_mask=pad)).all()


def test_bf16_autocast():
    m = model(TINY_BEATS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.embed(fbank(2, 64))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_weight_norm_conv_matches_torch_weight_norm():
    conv = WeightNormConv1d(32, 8, groups=4)
    conv.reset_parameters()
    with torch.no_grad():
        conv.weight_g.mul_(torch.rand_like(conv.weight_g) + 0.5)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(32, 32, 8, padding=4, groups=4), dim=2)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(conv.weight_g)
        ref.parametrizations.weight.original1.copy_(conv.weight_v)
        ref.bias.copy_(conv.bias)
        x = torch.randn(2, 32, 20)
        torch.testing.assert_close(conv(x), ref(x))


def test_gradient_decay_changes_gradients_not_values():
    x = fbank(1, 64)
    plain = model(TINY_BEATS).train()
    decayed = model(dataclasses.replace(TINY_BEATS, layer_wise_gradient_decay_ratio=0.5)).train()
    out_a, out_b = plain(x), decayed(x)
    torch.testing.assert_close(out_a, out_b)
    out_a.sum().backward()
    out_b.sum().backward()
    ga, gb = plain.patch_embedding.weight.grad, decayed.patch_embedding.weight.grad
    assert not torch.allclose(ga, gb)


def test_configs_and_normalize():
    assert set(CONFIGS) >= {"tiny", "small", "base"}
    cfg = get_config("tiny")
    cfg.encoder_layers = 99
    assert CONFIGS["tiny"].encoder_layers == 2  # get_config returns a copy
    assert get_config({"encoder_layers": 3, "unknown_key": 1}).encoder_layers == 3
    with pytest.raises(ValueError, match="unknown encoder config"):
        get_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(encoder_embed_dim=100, encoder_attention_heads=12)
    assert normalize_fbank(15.41663) == 0.0
    assert normalize_fbank(15.41663 + 2 * 6.55582) == pytest.approx(1.0)
    small = AudioEncoder("small")
    assert 10e6 < small.num_parameters < 15e6


# ---------------------------------------------------------------------------- BEATs names

# Looked up in microsoft/unilm beats/BEATs.py and beats/backbone.py (see the module docstring).
BEATS_TOP_LEVEL = {
    "patch_embedding.weight": (512, 1, 16, 16),  # Conv2d(1, 512, 16, 16, bias=False)
    "layer_norm.weight": (512,),
    "layer_norm.bias": (512,),
    "post_extract_proj.weight": (768, 512),
    "post_extract_proj.bias": (768,),
    "encoder.pos_conv.0.weight_g": (1, 1, 128),  # weight_norm(dim=2)
    "encoder.pos_conv.0.weight_v": (768, 48, 128),  # groups=16
    "encoder.pos_conv.0.bias": (768,),
    "encoder.layer_norm.weight": (768,),
    "encoder.layer_norm.bias": (768,),
}
BEATS_LAYER_0 = {
    "encoder.layers.0.self_attn.relative_attention_bias.weight": (320, 12),
    "encoder.layers.0.self_attn.k_proj.weight": (768, 768),
    "encoder.layers.0.self_attn.k_proj.bias": (768,),
    "encoder.layers.0.self_attn.v_proj.weight": (768, 768),
    "encoder.layers.0.self_attn.v_proj.bias": (768,),
    "encoder.layers.0.self_attn.q_proj.weight": (768, 768),
    "encoder.layers.0.self_attn.q_proj.bias": (768,),
    "encoder.layers.0.self_attn.out_proj.weight": (768, 768),
    "encoder.layers.0.self_attn.out_proj.bias": (768,),
    "encoder.layers.0.self_attn.grep_linear.weight": (8, 64),
    "encoder.layers.0.self_attn.grep_linear.bias": (8,),
    "encoder.layers.0.self_attn.grep_a": (1, 12, 1, 1),
    "encoder.layers.0.self_attn_layer_norm.weight": (768,),
    "encoder.layers.0.self_attn_layer_norm.bias": (768,),
    "encoder.layers.0.fc1.weight": (3072, 768),
    "encoder.layers.0.fc1.bias": (3072,),
    "encoder.layers.0.fc2.weight": (768, 3072),
    "encoder.layers.0.fc2.bias": (768,),
    "encoder.layers.0.final_layer_norm.weight": (768,),
    "encoder.layers.0.final_layer_norm.bias": (768,),
}
BEATS_LAYER_11 = {
    # the relative bias table is shared (one Parameter) but state_dict lists it in every layer
    "encoder.layers.11.self_attn.relative_attention_bias.weight": (320, 12),
    "encoder.layers.11.self_attn.k_proj.weight": (768, 768),
    "encoder.layers.11.self_attn.k_proj.bias": (768,),
    "encoder.layers.11.self_attn.v_proj.weight": (768, 768),
    "encoder.layers.11.self_attn.v_proj.bias": (768,),
    "encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    "encoder.layers.11.self_attn.q_proj.bias": (768,),
    "encoder.layers.11.self_attn.out_proj.weight": (768, 768),
    "encoder.layers.11.self_attn.out_proj.bias": (768,),
    "encoder.layers.11.self_attn.grep_linear.weight": (8, 64),
    "encoder.layers.11.self_attn.grep_linear.bias": (8,),
    "encoder.layers.11.self_attn.grep_a": (1, 12, 1, 1),
    "encoder.layers.11.self_attn_layer_norm.weight": (768,),
    "encoder.layers.11.self_attn_layer_norm.bias": (768,),
    "encoder.layers.11.fc1.weight": (3072, 768),
    "encoder.layers.11.fc1.bias": (3072,),
    "encoder.layers.11.fc2.weight": (768, 3072),
    "encoder.layers.11.fc2.bias": (768,),
    "encoder.layers.11.final_layer_norm.weight": (768,),
    "encoder.layers.11.final_layer_norm.bias": (768,),
}


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return AudioEncoder("base").eval()


def test_base_has_beats_names_and_shapes(base_model):
    shapes = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    expected = dict(BEATS_TOP_LEVEL)
    for i in range(12):
        expected.update({k.replace("layers.0.", f"layers.{i}."): v for k, v in BEATS_LAYER_0.items()})
    assert {k: shapes[k] for k in BEATS_LAYER_0} == BEATS_LAYER_0
    assert {k: shapes[k] for k in BEATS_LAYER_11} == BEATS_LAYER_11
    assert shapes == expected  # 10 + 12 * 20 = 250 keys, nothing else
    # same count as the reference BEATs model built from the released settings
    assert base_model.num_parameters == 90_311_792
    assert 88e6 < base_model.num_parameters < 92e6
    bias = [l.self_attn.relative_attention_bias.weight for l in base_model.encoder.layers]
    assert all(b is bias[0] for b in bias)  # shared, as in BEATs


def test_base_short_forward(base_model):
    with torch.no_grad():
        assert base_model(fbank(1, 64)).shape == (1, 32, 768)


def test_base_on_meta_device():
    with torch.device("meta"):
        m = AudioEncoder("base")
    assert m.num_parameters == 90_311_792


def test_load_base_beats_checkpoint_strict(base_model, tmp_path):
    path = tmp_path / "BEATs_like.pt"
    torch.save({"cfg": {**beats_config_from(base_model.cfg), "some_new_key": 1},
                "model": beats_state_dict_from(base_model)}, path)
    loaded = load_checkpoint(str(path))
    x = fbank(1, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), base_model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------- checkpoints


def write_beats(path, m: AudioEncoder, state=None, **extra):
    torch.save({"cfg": beats_config_from(m.cfg), "model": state if state is not None else m.state_dict(), **extra}, path)
    return str(path)


def perturbed(cfg, seed=1) -> AudioEncoder:
    """A model whose LayerNorms and gates are not at their init values."""
    m = model(cfg, seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or "grep_a" in name or "weight_g" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def test_beats_format_roundtrip_identical_outputs(tmp_path):
    m = perturbed(dataclasses.replace(TINY_BEATS, finetuned_model=True, predictor_class=5))
    path = write_beats(tmp_path / "beats.pt", m, label_dict={0: "/m/09x0r", 1: "/m/05zppz"})
    loaded = load_checkpoint(path)
    assert loaded.cfg == m.cfg and not loaded.training
    x = fbank(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.predict(x), m.predict(x), rtol=0, atol=0)
        assert loaded.predict(x).shape == (2, 5)
    bare = load_checkpoint(path, keep_predictor=False)
    assert bare.predictor is None and "predictor.weight" not in bare.state_dict()


def test_beats_cfg_missing_keys_take_beats_defaults(tmp_path):
    m = model(TINY_BEATS)
    cfg = beats_config_from(m.cfg)
    del cfg["deep_norm"]  # BEATsConfig default: False
    torch.save({"cfg": cfg, "model": m.state_dict()}, tmp_path / "c.pt")
    assert load_checkpoint(str(tmp_path / "c.pt")).cfg.deep_norm is False


def test_tied_relative_bias_stored_once_is_accepted(tmp_path):
    m = perturbed(TINY_BEATS)
    state = {k: v for k, v in m.state_dict().items()
             if "relative_attention_bias" not in k or ".layers.0." in k}
    loaded = load_checkpoint(write_beats(tmp_path / "once.pt", m, state))
    x = fbank(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path, caplog):
    m = model(TINY_BEATS)
    state = dict(m.state_dict())
    del state["encoder.layers.1.fc2.bias"]
    state["encoder.layers.1.extra_gate.weight"] = torch.zeros(3)
    state["encoder.layers.0.fc1.weight"] = torch.zeros(7, 128)
    path = write_beats(tmp_path / "bad.pt", m, state)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "1 missing keys" in msg and "encoder.layers.1.fc2.bias" in msg
    assert "1 unexpected keys" in msg and "encoder.layers.1.extra_gate.weight" in msg
    assert "encoder.layers.0.fc1.weight: checkpoint [7, 128] vs model [256, 128]" in msg
    with caplog.at_level(logging.WARNING):
        loose = load_checkpoint(path, strict=False)
    assert "missing keys" in caplog.text
    torch.testing.assert_close(loose.encoder.layers[0].fc2.weight, m.encoder.layers[0].fc2.weight)


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an encoder checkpoint"):
        load_checkpoint(str(tmp_path / "x.pt"))


def check_own_roundtrip(uri):
    m = perturbed(TINY_BEATS)
    assert save_checkpoint(m, uri, meta={"step": 7, "tag": "dcase", "when": object}) == uri
    loaded = load_checkpoint(uri)
    assert loaded.cfg == m.cfg
    assert loaded.meta["step"] == 7 and loaded.meta["tag"] == "dcase"
    x = fbank(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(x), m.embed(x), rtol=0, atol=0)
    return loaded


def test_own_format_roundtrip_local(tmp_path):
    uri = str(tmp_path / "sub" / "encoder.pt")
    check_own_roundtrip(uri)
    raw = torch.load(uri, weights_only=True)
    assert raw["asd_encoder"] == 1 and set(raw) == {"asd_encoder", "arch", "cfg", "model", "meta"}
    assert raw["arch"] == "transformer"


@pytest.mark.s3
def test_own_format_roundtrip_s3(s3_bucket):
    uri = f"{s3_bucket}/models/encoder.pt"
    check_own_roundtrip(uri)
    assert storage.exists(uri)
