"""Audio transformer over 16x16 patches of 128-bin log-mel filterbanks (BEATs / EAT geometry).

One file, nanoGPT style. ``AudioEncoder`` with the ``base`` config has the parameter names and
shapes of Microsoft's BEATs release, so a released checkpoint
(``{"cfg": {...}, "model": state_dict}``, e.g. ``BEATs_iter3_plus_AS2M.pt``) loads with
``strict=True`` through :func:`asd.models.registry.load_checkpoint`. The code is written from the description below,
not copied.

What BEATs does (read in microsoft/unilm ``beats/BEATs.py``, ``beats/backbone.py``,
``beats/modules.py``, commit 768a3c8 / last change to ``beats/`` 732d834, 2024-04-05)
-----------------------------------------------------------------------------------------------
* ``BEATs.preprocess``: kaldi fbank of ``waveform * 2**15`` (128 mel bins, 16 kHz, 25 ms frames,
  10 ms shift), then ``(fbank - 15.41663) / (2 * 6.55582)``  -> :func:`normalize_fbank`.
* ``patch_embedding = Conv2d(1, embed_dim=512, kernel=stride=input_patch_size=16,
  bias=conv_bias=False)`` on ``fbank.unsqueeze(1)`` (B, 1, T, F); the output (B, 512, T/16, F/16)
  is flattened time-major (patch n = t * (F/16) + f) and transposed to (B, N, 512).
* ``layer_norm = LayerNorm(512)`` on the patches, then ``post_extract_proj = Linear(512, 768)``
  (only when ``embed_dim != encoder_embed_dim``), ``dropout_input``.
* ``encoder`` (TransformerEncoder):
  - ``pos_conv = Sequential(weight_norm(Conv1d(768, 768, kernel=conv_pos=128,
    padding=64, groups=conv_pos_groups=16), dim=2), SamePad(128), GELU())``. The old
    ``nn.utils.weight_norm`` names the parameters ``pos_conv.0.weight_g`` (1, 1, 128) and
    ``pos_conv.0.weight_v`` (768, 48, 128), plus ``pos_conv.0.bias`` (768); the new
    ``parametrizations.weight_norm`` would call them ``parametrizations.weight.original0/1``.
    We keep the BEATs names with our own :class:`WeightNormConv1d` (weight =
    g * v / ||v|| with the norm over dims 0 and 1). SamePad drops the last step (even kernel).
    Padded positions are zeroed before the conv; ``x = x + pos_conv(x)``.
  - ``layer_norm = LayerNorm(768)``: applied right after the positional conv when
    ``layer_norm_first`` is False (BEATs: post-norm), at the very end otherwise.
  - ``layers.N`` (TransformerSentenceEncoderLayer), N = 0..encoder_layers-1:
    ``self_attn.{q_proj,k_proj,v_proj,out_proj}`` Linear(768, 768) with bias;
    ``self_attn.relative_attention_bias`` Embedding(num_buckets=320, heads=12): created in every
    layer, then layers 1.. are re-pointed at layer 0's module, so it is ONE parameter that
    nevertheless appears under every layer's prefix in ``state_dict()`` (12 keys, equal values;
    strict loading needs all of them); the bias is computed once (layer 0) and passed on;
    ``self_attn.grep_linear`` Linear(head_dim=64, 8) and ``self_attn.grep_a`` (1, 12, 1, 1)
    in every layer (gated relative position bias, ``gru_rel_pos``);
    ``self_attn_layer_norm``, ``fc1`` Linear(768, 3072), ``fc2`` Linear(3072, 768),
    ``final_layer_norm``; activation gelu.
  - Post-norm layer: ``x = LN(residual * alpha + attn(x))``, ``x = LN(residual * alpha + ffn(x))``
    with DeepNorm ``alpha = (2 * encoder_layers) ** 0.25`` when ``deep_norm`` (else 1). DeepNorm init:
    xavier_normal gain 1 for q/k, gain ``beta = (8 * encoder_layers) ** -0.25`` for v/out/fc1/fc2,
    after BERT init (Linear/Embedding normal(0, 0.02), biases 0). pos_conv init
    normal(0, sqrt(4 / (conv_pos * 768))), bias 0.
  - Attention: q * head_dim**-0.5; scores are shifted by their row max and scaled by alpha=32 (a
    numerical trick equal to plain softmax(q k^T / sqrt(d))). Relative bias: bucket of
    ``key_pos - query_pos`` (T5-style, bidirectional: half the buckets per sign, exact below
    num_buckets/4, log-spaced up to max_distance, clipped), looked up -> (H, Lq, Lk). Gate
    (gru_rel_pos), from the projected query per head (B, H, L, 64):
    ``a, b = sigmoid(grep_linear(q).view(B, H, L, 2, 4).sum(-1)).chunk(2)``,
    ``bias = (a * (b * grep_a - 1) + 2) * bias``; added to the scores before the softmax.
  - ``layer_wise_gradient_decay_ratio`` scales gradients (not values) entering each layer;
    ``encoder_layerdrop`` skips layers while training.
* Fine-tuned checkpoints (``finetuned_model=True``): ``predictor_dropout`` and
  ``predictor = Linear(768, predictor_class=527)``; BEATs returns sigmoid(mean over patches of
  the per-patch logits).
* ``BEATsConfig`` defaults: input_patch_size=-1 (the checkpoint sets 16), embed_dim=512,
  conv_bias=False, encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
  encoder_attention_heads=12, activation_fn="gelu", layer_wise_gradient_decay_ratio=1.0,
  layer_norm_first=False, deep_norm=False, dropout=0.1, attention_dropout=0.1,
  activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0, conv_pos=128,
  conv_pos_groups=16, relative_position_embedding=False, num_buckets=320, max_distance=1280,
  gru_rel_pos=False, finetuned_model=False, predictor_dropout=0.1, predictor_class=527.
  The released models set relative_position_embedding=True, max_distance=800, gru_rel_pos=True,
  deep_norm=True, input_patch_size=16 (as third-party converters of BEATs_iter3_plus_AS2M.pt
  also record); our ``base`` uses those values. For a BEATs-format file, keys missing from its
  ``cfg`` take the BEATsConfig defaults above (that is how BEATs itself would build it).

Choices made here
-----------------
* Layout is (B, N, C) throughout; attention uses ``F.scaled_dot_product_attention`` with the
  (gated) relative bias as an additive float mask, so no dtype is assumed (bf16 autocast works).
* ``mask`` (EAT / data2vec 2.0 student input): True = patch dropped. The positional conv runs on
  the FULL sequence (dropped patches included, as in EAT where positions are added before
  dropping), then only kept patches go through the transformer; the relative position bias is
  computed from the kept patches' ORIGINAL indices, so positions stay correct. Every row must
  drop the same number of patches.
* ``padding_mask`` is frame-level (B, T), True = padding. A time patch is padding when all its 16
  frames are; all frequency patches of that time step follow. (BEATs' own ``forward_padding_mask``
  groups N consecutive frames instead, which ignores the 2-D patch grid; we do not copy that.)
* ``layer`` indexes transformer blocks from 0 (negative allowed, -1 = last); the output is the
  block's output, as BEATs' ``tgt_layer``. ``layer=None`` = last block (+ final LayerNorm for
  pre-norm configs). ``return_all_layers`` returns every block's output (len = encoder_layers).
* Fine-tuned ``predictor`` is kept (so such checkpoints load strictly and round-trip), never used
  by ``forward``/``embed``; :meth:`AudioEncoder.predict` gives BEATs' clip probabilities.
  ``load_checkpoint(..., keep_predictor=False)`` drops it.
* A checkpoint that stores the tied ``relative_attention_bias`` only for layer 0 (e.g. written by
  a de-duplicating converter) is accepted: the other layers are filled from layer 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

log = logging.getLogger(__name__)

FBANK_MEAN = 15.41663  # BEATs.preprocess fbank_mean
FBANK_STD = 6.55582  # BEATs.preprocess fbank_std
TRANSFORMER = "transformer"  # "arch" of an AudioEncoder checkpoint (files without "arch" are one)
# Clip pooling of the patch outputs (B, N, D):
#   mean, max, meanmax (both, 2D)   over every patch;
#   freq_mean (F*D), freq_meanstd (2*F*D)   over time only, per frequency band of patches
#   (F = num_mel_bins / patch size), so the embedding keeps where in the spectrum things are.
#   benchmarks/pretrain.py measured freq_meanstd well above mean for pre-trained encoders.
POOLS = ("mean", "max", "meanmax", "freq_mean", "freq_meanstd")


def pooled_dim(cfg: "EncoderConfig", pool: str) -> int:
    """Width of the clip embedding that ``AudioEncoder.embed(pool=pool)`` returns."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    bands = cfg.num_mel_bins // cfg.input_patch_size
    return cfg.encoder_embed_dim * {"mean": 1, "max": 1, "meanmax": 2, "freq_mean": bands,
                                    "freq_meanstd": 2 * bands}[pool]


# ----------------------------------------------------------------------------- config


@dataclass
class EncoderConfig:
    """Architecture and regularisation. Names follow ``BEATsConfig`` where they overlap."""

    # patch front end
    input_patch_size: int = 16  # square patch side, in frames and mel bins
    embed_dim: int = 512  # patch embedding width
    conv_bias: bool = False  # bias in the patch embedding conv
    num_mel_bins: int = 128  # fbank bins expected on input (BEATs: 128)
    # transformer
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"  # "gelu" or "relu"
    layer_norm_first: bool = False  # pre-norm (True) or post-norm (False, BEATs)
    deep_norm: bool = True  # DeepNorm residual scaling and init (post-norm only)
    layer_wise_gradient_decay_ratio: float = 1.0
    # dropouts (BEATsConfig defaults are 0.1; we default to none, as EAT)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    # convolutional positional embedding
    conv_pos: int = 128  # kernel size
    conv_pos_groups: int = 16
    # relative position bias
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True  # gated relative position bias
    # classification head of fine-tuned BEATs checkpoints
    finetuned_model: bool = False
    predictor_dropout: float = 0.0
    predictor_class: int = 527

    def __post_init__(self):
        if self.input_patch_size <= 0:
            raise ValueError(f"input_patch_size must be positive, got {self.input_patch_size}")
        if self.num_mel_bins % self.input_patch_size:
            raise ValueError(f"num_mel_bins={self.num_mel_bins} is not a multiple of input_patch_size={self.input_patch_size}")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(f"encoder_embed_dim={self.encoder_embed_dim} is not divisible by encoder_attention_heads={self.encoder_attention_heads}")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(f"encoder_embed_dim={self.encoder_embed_dim} is not divisible by conv_pos_groups={self.conv_pos_groups}")
        if self.activation_fn not in ("gelu", "relu"):
            raise ValueError(f"activation_fn must be 'gelu' or 'relu', got {self.activation_fn!r}")
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("deep_norm applies to post-norm layers only (layer_norm_first=False)")
        if self.relative_position_embedding and self.num_buckets < 4:
            raise ValueError(f"num_buckets must be >= 4, got {self.num_buckets}")

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads


CONFIGS: dict[str, EncoderConfig] = {
    # tests and smoke runs: no relative bias (fast), short positional conv
    "tiny": EncoderConfig(
        embed_dim=64, encoder_layers=2, encoder_embed_dim=128, encoder_ffn_embed_dim=256,
        encoder_attention_heads=4, conv_pos=32, conv_pos_groups=16,
        relative_position_embedding=False, gru_rel_pos=False,
    ),
    "small": EncoderConfig(
        embed_dim=512, encoder_layers=6, encoder_embed_dim=384, encoder_ffn_embed_dim=1536,
        encoder_attention_heads=6,
    ),
    # BEATs-identical architecture (the released models' settings)
    "base": EncoderConfig(),
}

# BEATsConfig.__init__ defaults, used for keys a BEATs checkpoint's cfg leaves out.
BEATS_CONFIG_DEFAULTS: dict = {
    "input_patch_size": -1, "embed_dim": 512, "conv_bias": False,
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 1.0, "layer_norm_first": False, "deep_norm": False,
    "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0, "dropout_input": 0.0,
    "conv_pos": 128, "conv_pos_groups": 16,
    "relative_position_embedding": False, "num_buckets": 320, "max_distance": 1280,
    "gru_rel_pos": False,
    "finetuned_model": False, "predictor_dropout": 0.1, "predictor_class": 527,
}


def get_config(name_or_cfg) -> EncoderConfig:
    """A fresh ``EncoderConfig`` from a name in :data:`CONFIGS`, a config, or a dict of fields."""
    if isinstance(name_or_cfg, EncoderConfig):
        return replace(name_or_cfg)
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in CONFIGS:
            raise ValueError(f"unknown encoder config {name_or_cfg!r}; known: {sorted(CONFIGS)}")
        return replace(CONFIGS[name_or_cfg])
    if isinstance(name_or_cfg, dict):
        return _config_from_dict(name_or_cfg, source="dict")
    raise TypeError(f"expected a config name, EncoderConfig or dict, got {type(name_or_cfg).__name__}")


def _config_from_dict(d: dict, source: str) -> EncoderConfig:
    names = {f.name for f in fields(EncoderConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        log.debug("%s: ignoring config keys not used by EncoderConfig: %s", source, unknown)
    return EncoderConfig(**{k: v for k, v in d.items() if k in names})


def config_from_beats(beats_cfg: dict) -> EncoderConfig:
    """``EncoderConfig`` from a BEATs checkpoint's ``cfg`` (missing keys: BEATsConfig defaults)."""
    return _config_from_dict({**BEATS_CONFIG_DEFAULTS, **beats_cfg}, source="BEATs cfg")


def beats_config_from(cfg: EncoderConfig) -> dict:
    """The BEATsConfig dict for ``cfg`` (for writing a checkpoint BEATs' own code can read)."""
    d = asdict(cfg)
    return {k: d[k] for k in BEATS_CONFIG_DEFAULTS}


def normalize_fbank(fbank, mean: float = FBANK_MEAN, std: float = FBANK_STD):
    """BEATs input normalisation of a kaldi log-mel fbank: ``(fbank - mean) / (2 * std)``."""
    return (fbank - mean) / (2 * std)


# ----------------------------------------------------------------------------- blocks


class WeightNormConv1d(nn.Module):
    """Conv1d with weight normalisation over dim 2, stored as BEATs does (weight_g, weight_v, bias).

    weight = weight_g * weight_v / ||weight_v||, the norm taken over output and input channels
    separately for each kernel tap (``weight_g`` has shape (1, 1, kernel)).
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding = kernel_size // 2
        self.groups = groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))

    def reset_parameters(self) -> None:
        channels, _, kernel = self.weight_v.shape
        nn.init.normal_(self.weight_v, mean=0.0, std=math.sqrt(4.0 / (kernel * channels)))
        nn.init.zeros_(self.bias)
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, N)
        v = self.weight_v
        weight = v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drop the extra step an even kernel with padding k//2 produces, keeping length N."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, : -self.remove] if self.remove else x


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """BEATs/T5 bidirectional bucket of ``key_pos - query_pos`` (int tensor, any shape)."""
    half = num_buckets // 2
    buckets = (relative_position > 0).long() * half
    distance = relative_position.abs()
    max_exact = half // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(is_small, distance, large)


class SelfAttention(nn.Module):
    """Multi-head self-attention with BEATs' (gated) relative position bias."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads = heads
        self.head_dim = cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if cfg.relative_position_embedding:
            # one table for the whole encoder: TransformerEncoder re-points layers 1.. at layer 0's
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, heads)
        self.gru_rel_pos = cfg.gru_rel_pos
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def position_bias(self, positions: Tensor) -> Tensor:
        """(B or 1, H, N, N) bias for patches at integer ``positions`` (B or 1, N)."""
        relative = positions[:, None, :] - positions[:, :, None]  # [b, query i, key j] = pos j - pos i
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(0, 3, 1, 2)

    def forward(self, x: Tensor, position_bias: Tensor | None = None, padding_mask: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

        bias = None
        if position_bias is not None:
            bias = position_bias
            if self.gru_rel_pos:  # gate the shared bias per query, per head
                gates = torch.sigmoid(self.grep_linear(q).view(B, self.num_heads, N, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            bias = bias.to(q.dtype)
        if padding_mask is not None:
            # a finite minimum (not -inf, not a bool mask): an all-padding row stays finite
            keys_padded = padding_mask[:, None, None, :]  # (B, 1, 1, N)
            if bias is None:
                bias = torch.zeros(keys_padded.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(keys_padded, torch.finfo(bias.dtype).min)

        dropout_p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))


class EncoderLayer(nn.Module):
    """One transformer block (BEATs' TransformerSentenceEncoderLayer): post- or pre-norm."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)
        self.activation = F.gelu if cfg.activation_fn == "gelu" else F.relu
        self.layer_norm_first = cfg.layer_norm_first
        self.residual_scale = (2 * cfg.encoder_layers) ** 0.25 if cfg.deep_norm else 1.0

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))

    def forward(self, x: Tensor, position_bias: Tensor | None = None, padding_mask: Tensor | None = None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), position_bias, padding_mask))
            return x + self.dropout(self.feed_forward(self.final_layer_norm(x)))
        a = self.residual_scale
        x = self.self_attn_layer_norm(x * a + self.dropout(self.self_attn(x, position_bias, padding_mask)))
        return self.final_layer_norm(x * a + self.dropout(self.feed_forward(x)))


class TransformerEncoder(nn.Module):
    """Conv positional embedding (:meth:`positions`), then the stack of layers (``forward``; BEATs' ``encoder``)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), SamePad(cfg.conv_pos), nn.GELU()
        )
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.relative_position_embedding = cfg.relative_position_embedding
        if cfg.relative_position_embedding:
            shared = self.layers[0].self_attn.relative_attention_bias
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = shared
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.layer_norm_first
        self.dropout = nn.Dropout(cfg.dropout)
        self.layerdrop = cfg.encoder_layerdrop
        self.grad_decay = cfg.layer_wise_gradient_decay_ratio
        self.activation_checkpointing = False  # recompute each block in backward (asd.training.loop.TrainConfig)

    def positions(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The full patch sequence (B, N, C) with its convolutional positions added (and, for
        post-norm blocks, layer-normalised): every step before patches are dropped."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        return self.dropout(x)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        keep_index: Tensor | None = None,
        layer: int | None = None,
        return_all_layers: bool = False,
    ) -> Tensor | list[Tensor]:
        """The blocks on ``x``, the output of :meth:`positions` (B, N, C), keeping only the patches
        ``keep_index`` (B, N_kept) when given."""
        positions = None
        if keep_index is not None:
            x = x.gather(1, keep_index[..., None].expand(-1, -1, x.shape[-1]))
            if padding_mask is not None:
                padding_mask = padding_mask.gather(1, keep_index)
            positions = keep_index
        position_bias = None
        if self.relative_position_embedding:
            if positions is None:
                positions = torch.arange(x.shape[1], device=x.device)[None]
            position_bias = self.layers[0].self_attn.position_bias(positions)

        last = len(self.layers) - 1 if layer is None else layer
        outputs = []
        for i, block in enumerate(self.layers[: last + 1]):
            if self.grad_decay != 1.0 and torch.is_grad_enabled():  # scale gradients, not values
                x = x * self.grad_decay + x.detach() * (1.0 - self.grad_decay)
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                pass
            elif self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, position_bias, padding_mask, use_reentrant=False)
            else:
                x = block(x, position_bias, padding_mask)
            outputs.append(x)
        if return_all_layers:
            return outputs
        if self.layer_norm_first and layer is None:
            x = self.layer_norm(x)
        return x


# ----------------------------------------------------------------------------- model


def _masked_moments(x: Tensor, valid: Tensor | None, var: bool = False) -> tuple[Tensor, Tensor | None]:
    """Mean (and population variance when ``var``) over dim 1, counting only ``valid`` (bool,
    broadcastable to ``x``; None: every position)."""
    if valid is None:
        return x.mean(dim=1), (x.var(dim=1, unbiased=False) if var else None)
    w = valid.to(x.dtype)
    count = w.sum(dim=1).clamp(min=1)
    mean = (x * w).sum(dim=1) / count
    return mean, ((((x - mean.unsqueeze(1)) ** 2) * w).sum(dim=1) / count if var else None)


class AudioEncoder(nn.Module):
    """ViT over 16x16 log-mel patches; module names and shapes follow BEATs (see module docstring)."""

    input = "fbank"  # the feature matrix it reads (asd.stores.features.MATRICES)

    def __init__(self, cfg: EncoderConfig | str = "base"):
        super().__init__()
        cfg = get_config(cfg)
        self.cfg = cfg
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = TransformerEncoder(cfg)
        if cfg.finetuned_model:
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)
        else:
            self.predictor = None
        self.meta: dict = {}  # filled by load_checkpoint from the file's "meta"
        self.init_weights()

    # -- init -------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """From-scratch init: BERT-style normal(0.02) + BEATs' DeepNorm and pos-conv init."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, SelfAttention) and module.gru_rel_pos:
                nn.init.ones_(module.grep_a)
        w = self.patch_embedding.weight  # as a linear map of the flattened patch (MAE-style)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.patch_embedding.bias is not None:
            nn.init.zeros_(self.patch_embedding.bias)
        self.encoder.pos_conv[0].reset_parameters()
        if self.cfg.deep_norm:
            beta = (8 * self.cfg.encoder_layers) ** -0.25
            for block in self.encoder.layers:
                attn = block.self_attn
                nn.init.xavier_normal_(attn.k_proj.weight, gain=1.0)
                nn.init.xavier_normal_(attn.q_proj.weight, gain=1.0)
                nn.init.xavier_normal_(attn.v_proj.weight, gain=beta)
                nn.init.xavier_normal_(attn.out_proj.weight, gain=beta)
                nn.init.xavier_normal_(block.fc1.weight, gain=beta)
                nn.init.xavier_normal_(block.fc2.weight, gain=beta)

    # -- forward ----------------------------------------------------------------------------

    def patchify(self, fbank: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, T, F) log-mel -> ((B, N, embed_dim) patch features, (time_patches, freq_patches)).

        T is cropped to a multiple of the patch size; patches are ordered time-major.
        """
        if fbank.dim() != 3:
            raise ValueError(f"fbank must be (batch, frames, mel_bins), got shape {tuple(fbank.shape)}")
        p = self.cfg.input_patch_size
        frames, bins = fbank.shape[1], fbank.shape[2]
        if bins != self.cfg.num_mel_bins:
            raise ValueError(f"fbank has {bins} mel bins, the encoder expects {self.cfg.num_mel_bins}")
        if frames < p:
            raise ValueError(f"fbank has {frames} frames, fewer than one patch ({p})")
        x = fbank[:, : frames // p * p].unsqueeze(1).to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(x)  # (B, E, T/p, F/p)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        return self.layer_norm(x), grid

    def patch_padding_mask(self, padding_mask: Tensor, grid: tuple[int, int]) -> Tensor:
        """Frame padding (B, T), True = padded -> patch padding (B, N): a time patch is padding
        when all its frames are."""
        time_patches, freq_patches = grid
        p = self.cfg.input_patch_size
        if padding_mask.dim() != 2 or padding_mask.shape[1] < time_patches * p:
            raise ValueError(f"padding_mask must be (batch, frames) like the fbank, got {tuple(padding_mask.shape)}")
        frames = padding_mask[:, : time_patches * p].bool().view(-1, time_patches, p).all(-1)
        return frames[:, :, None].expand(-1, -1, freq_patches).reshape(frames.shape[0], -1)

    @staticmethod
    def kept_index(mask: Tensor, num_patches: int, num_kept: int | None = None) -> Tensor:
        """(B, N) bool, True = drop -> (B, N_kept) indices of kept patches in original order.
        ``num_kept``: what the mask's maker guarantees every row keeps (no check, so no wait for
        the device: the pre-training step passes it); without it the rows are counted and checked."""
        if mask.dim() != 2 or mask.shape[1] != num_patches:
            raise ValueError(f"mask must be (batch, {num_patches}) for this input, got {tuple(mask.shape)}")
        if num_kept is None:
            dropped = mask.sum(dim=1)
            if bool((dropped != dropped[0]).any()):
                raise ValueError(f"every row of mask must drop the same number of patches, got {dropped.tolist()}")
            num_kept = num_patches - int(dropped[0])
        order = torch.argsort(mask.long(), dim=1, stable=True)  # kept (0) first, in original order
        return order[:, :num_kept]

    def forward(
        self,
        fbank: Tensor,
        padding_mask: Tensor | None = None,
        mask: Tensor | None = None,
        layer: int | None = None,
        return_all_layers: bool = False,
    ) -> Tensor | list[Tensor]:
        """Normalised fbank (B, T, num_mel_bins) -> (B, N_kept, encoder_embed_dim).

        padding_mask: optional bool (B, T) frames, True = padding (keys masked in attention).
        mask: optional bool (B, N) patches to drop (same count per row); None keeps all N.
        layer: block index (0-based, negative from the end) whose output is returned.
        return_all_layers: return the list of every block's output instead.
        """
        x, patch_padding = self.front_end(fbank, padding_mask)
        keep = self.kept_index(mask, x.shape[1]) if mask is not None else None
        return self.from_front_end(x, patch_padding, keep, layer, return_all_layers)

    def front_end(self, fbank: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Everything before patches are dropped: patch embedding, projection and positions ->
        ((B, N, encoder_embed_dim), patch padding (B, N) or None). Masked pre-training computes it
        once per clip and shares it among the clip's masked clones (:meth:`from_front_end`)."""
        x, grid = self.patchify(fbank)
        patch_padding = self.patch_padding_mask(padding_mask, grid) if padding_mask is not None else None
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = self.dropout_input(x)
        return self.encoder.positions(x, patch_padding), patch_padding

    def from_front_end(self, x: Tensor, patch_padding: Tensor | None = None, keep: Tensor | None = None,
                       layer: int | None = None, return_all_layers: bool = False) -> Tensor | list[Tensor]:
        """The blocks on a :meth:`front_end` output, keeping only the patches ``keep`` (B, N_kept;
        :meth:`kept_index` of a mask) when given."""
        return self.encoder(x, patch_padding, keep, self._layer_index(layer), return_all_layers)

    def _layer_index(self, layer: int | None) -> int | None:
        if layer is None:
            return None
        n = self.cfg.encoder_layers
        if not -n <= layer < n:
            raise ValueError(f"layer must be in [{-n}, {n}), got {layer}")
        return layer % n

    def unused_parameters(self, layer: int | None) -> list[nn.Parameter]:
        """Parameters that ``forward(..., layer=layer)`` never reaches: the blocks after ``layer`` and,
        with pre-norm blocks, the final layer norm (applied only when no layer is named). Training
        at partial depth freezes them: DDP needs every trainable parameter to get a gradient."""
        idx = self._layer_index(layer)
        if idx is None:
            return []
        unused = [p for block in self.encoder.layers[idx + 1:] for p in block.parameters()]
        if self.encoder.layer_norm_first:
            unused += list(self.encoder.layer_norm.parameters())
        return unused

    def embed(self, fbank: Tensor, layer: int | None = None, pool: str = "mean", padding_mask: Tensor | None = None) -> Tensor:
        """Clip embedding pooled over (non-padded) patches, ``(B, pooled_dim(cfg, pool))``: see
        :data:`POOLS`."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        x = self.forward(fbank, padding_mask=padding_mask, layer=layer)
        grid = self._grid(fbank)
        valid = None if padding_mask is None else ~self.patch_padding_mask(padding_mask, grid)[..., None]
        if pool.startswith("freq_"):
            # (B, T, F, D): statistics over time patches, one per frequency band
            g = x.view(x.shape[0], grid[0], grid[1], -1)
            v = None if valid is None else valid.view(x.shape[0], grid[0], grid[1], 1)
            mean, var = _masked_moments(g, v, var=pool == "freq_meanstd")
            if var is None:
                return mean.flatten(1)
            return torch.cat([mean.flatten(1), var.clamp(min=1e-10).sqrt().flatten(1)], dim=-1)
        if pool == "mean":
            return _masked_moments(x, valid)[0]
        top = x.amax(dim=1) if valid is None else x.masked_fill(~valid, torch.finfo(x.dtype).min).amax(dim=1)
        if pool == "max":
            return top
        return torch.cat([_masked_moments(x, valid)[0], top], dim=-1)

    def _grid(self, fbank: Tensor) -> tuple[int, int]:
        p = self.cfg.input_patch_size
        return fbank.shape[1] // p, fbank.shape[2] // p

    def predict(self, fbank: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Fine-tuned BEATs head: (B, predictor_class) sigmoid of the patch-averaged logits."""
        if self.predictor is None:
            raise RuntimeError("this encoder has no predictor (cfg.finetuned_model is False)")
        logits = self.predictor(self.predictor_dropout(self.forward(fbank, padding_mask=padding_mask)))
        if padding_mask is None:
            return torch.sigmoid(logits.mean(dim=1))
        valid = ~self.patch_padding_mask(padding_mask, self._grid(fbank))[..., None]
        return torch.sigmoid((logits * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1))

    @property
    def min_frames(self) -> int:
        """Shortest input (frames) the encoder embeds: one patch."""
        return self.cfg.input_patch_size

    @property
    def num_parameters(self) -> int:
        """Number of distinct parameters (the shared relative-position table counted once)."""
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- checkpoints


def beats_state_dict_from(model: nn.Module) -> dict[str, Tensor]:
    """The state dict under BEATs' names (ours already match); unwraps DDP / torch.compile."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            break
    sd = model.state_dict()
    for prefix in ("_orig_mod.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def fill_tied_relative_bias(state: dict, cfg: EncoderConfig) -> dict:
    """Give every layer layer 0's relative_attention_bias (the tensor is shared in the model)."""
    key = "encoder.layers.{}.self_attn.relative_attention_bias.weight"
    if not cfg.relative_position_embedding or key.format(0) not in state:
        return state
    state = dict(state)
    first = state[key.format(0)]
    for i in range(1, cfg.encoder_layers):
        other = state.get(key.format(i))
        if other is not None and (other.shape != first.shape or not torch.equal(other, first)):
            log.warning("%s differs from layer 0's; the table is shared, layer 0's is used", key.format(i))
        state[key.format(i)] = first
    return state
