"""The models attribute fine-tuning trains: an encoder of any architecture with a margin head on
its pooled embedding (:class:`AttributeModel`), several of them side by side (:class:`EnsembleModel`),
and low-rank adapters for the transformer's attention projections (:class:`LoRALinear`), merged into
plain weights on export (:func:`merge_lora`). The training objective is :mod:`asd.stages.finetune`'s."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from asd.models.encoder import AudioEncoder, EncoderConfig, pooled_dim
from asd.models.heads import MarginHead, make_head
from asd.models.registry import build


class LoRALinear(nn.Module):
    """``y = x W^T + b + (alpha / r) x A^T B^T``; ``weight``/``bias`` keep nn.Linear's names, so a
    plain encoder state dict loads into it, and :meth:`merged` gives the nn.Linear back."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight.copy_(self.weight + (self.lora_B @ self.lora_A) * self.scaling)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


def add_lora(encoder: AudioEncoder, rank: int, alpha: float, targets: tuple[str, ...]) -> int:
    """Wrap the ``targets`` projections of every attention block; returns how many."""
    n = 0
    for layer in encoder.encoder.layers:
        attn = layer.self_attn
        for name in targets:
            base = getattr(attn, name, None)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"lora target {name!r} is not a Linear of the attention block")
            setattr(attn, name, LoRALinear(base, rank, alpha))
            n += 1
    return n


def merge_lora(encoder: AudioEncoder) -> AudioEncoder:
    """A copy of ``encoder`` with every adapter folded into its Linear."""
    out = copy.deepcopy(encoder)
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return out


class AttributeModel(nn.Module):
    """Encoder -> pooled embedding -> margin head cosines ``(B, C, S)``. ``encoder_cfg`` names the
    encoder (a config of any architecture of :mod:`asd.models.registry`); ``fcfg`` holds the
    fine-tuning settings the model depends on (:class:`asd.stages.finetune.FinetuneConfig`: head,
    pooling, layer, LoRA, frozen blocks, statistics exchange)."""

    def __init__(self, encoder_cfg, num_classes: int, fcfg):
        super().__init__()
        self.encoder = build(encoder_cfg)
        dim = pooled_dim(encoder_cfg, fcfg.pool) if isinstance(encoder_cfg, EncoderConfig) else encoder_cfg.embed_dim
        # statistics exchange: classes [original | as a clip's own content | as a partner's statistics]
        head_classes = num_classes * (3 if fcfg.statex_prob > 0 else 1)
        self.head: MarginHead = make_head(fcfg.head, dim, head_classes, fcfg.subclusters, fcfg.scale, fcfg.margin)
        self.pool, self.layer = fcfg.pool, fcfg.layer
        if fcfg.lora_rank > 0:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            add_lora(self.encoder, fcfg.lora_rank, fcfg.lora_alpha, fcfg.lora_targets)
        elif fcfg.freeze_layers > 0:
            frozen = [self.encoder.patch_embedding, self.encoder.layer_norm, *self.encoder.encoder.layers[: fcfg.freeze_layers]]
            if self.encoder.post_extract_proj is not None:
                frozen.append(self.encoder.post_extract_proj)
            for m in frozen:
                for p in m.parameters():
                    p.requires_grad_(False)
            if fcfg.freeze_layers >= 1:  # the relative-position table is shared with block 0
                bias = getattr(self.encoder.encoder.layers[0].self_attn, "relative_attention_bias", None)
                if bias is not None:
                    bias.weight.requires_grad_(False)
        if isinstance(self.encoder, AudioEncoder):  # blocks after `layer` (and their LoRA) never run
            for p in self.encoder.unused_parameters(self.layer):
                p.requires_grad_(False)

    def forward(self, fbank: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.encoder.embed(fbank, layer=self.layer, pool=self.pool)
        return emb, self.head(emb)


class EnsembleModel(nn.Module):
    """``n`` independent :class:`AttributeModel` s; ``forward(inputs)`` runs member i on ``inputs[i]``."""

    def __init__(self, n: int, build):
        super().__init__()
        self.members = nn.ModuleList(build() for _ in range(n))  # initialised one after another

    def forward(self, inputs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        return [m(x) for m, x in zip(self.members, inputs)]


def member_tag(tag: str, member: int) -> str:
    """Tag (models/<tag>) of ensemble member ``member``: the first keeps the plain tag."""
    return f"{tag}-m{member}" if member else tag


__all__ = ["AttributeModel", "EnsembleModel", "LoRALinear", "add_lora", "member_tag", "merge_lora"]
