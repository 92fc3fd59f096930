"""Margin-based classification heads for attribute fine-tuning (:mod:`asd.stages.finetune`).

Every head holds ``C x S`` unit-norm class centres (``S`` sub-clusters per class, 1 by default)
and maps embeddings to cosine similarities; the loss turns them into logits:

* :class:`ArcFace` (Deng et al., CVPR 2019): logit of the true class ``s * cos(theta + m)``,
  the others ``s * cos(theta)``, fixed scale ``s`` and additive angular margin ``m``.
* :class:`AdaCos` (Zhang et al., CVPR 2019): no margin; the scale is set from the batch
  (``s = log(B_avg) / cos(min(pi/4, theta_med))``, starting at ``sqrt(2) log(C - 1)``), so
  there is no scale to tune. With ``subclusters > 1`` it is the *sub-cluster AdaCos* loss
  used by DCASE 2022-2025 top systems (Wilkinghoff; Kuroyanagi et al.): a class's logit is the
  log-sum-exp of its sub-clusters' scaled cosines, so one class may cover several modes.

Both accept soft targets (mixup): ``loss(cos, y_a, y_b, lam)`` = ``lam * CE(y_a) + (1 - lam) *
CE(y_b)`` with the margin applied to the respective target class.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

HEADS = ("arcface", "adacos")


class MarginHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, subclusters: int = 1):
        super().__init__()
        if num_classes < 1 or subclusters < 1:
            raise ValueError("num_classes and subclusters must be >= 1")
        self.num_classes = num_classes
        self.subclusters = subclusters
        self.weight = nn.Parameter(torch.empty(num_classes * subclusters, dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Cosines ``(B, C, S)`` between L2-normalised embeddings and class centres."""
        cos = F.linear(F.normalize(x.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))
        return cos.view(x.shape[0], self.num_classes, self.subclusters)

    @staticmethod
    def class_cosine(cos: Tensor) -> Tensor:
        """(B, C): a class's similarity is that of its closest sub-cluster (for accuracy)."""
        return cos.max(dim=-1).values

    def logits(self, cos: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, cos: Tensor, y_a: Tensor, y_b: Tensor | None = None, lam: float = 1.0) -> Tensor:
        loss = F.cross_entropy(self.logits(cos, y_a), y_a)
        if y_b is not None and lam < 1.0:
            loss = lam * loss + (1.0 - lam) * F.cross_entropy(self.logits(cos, y_b), y_b)
        return loss


class ArcFace(MarginHead):
    def __init__(self, dim: int, num_classes: int, subclusters: int = 1, scale: float = 30.0, margin: float = 0.5):
        super().__init__(dim, num_classes, subclusters)
        self.scale = float(scale)
        self.margin = float(margin)

    def logits(self, cos: Tensor, target: Tensor) -> Tensor:
        c = self.class_cosine(cos).clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.acos(c)
        onehot = F.one_hot(target, self.num_classes).bool()
        # keep the margin monotonic past pi - m (the usual "easy margin" fallback)
        with_margin = torch.where(theta + self.margin < math.pi, torch.cos(theta + self.margin),
                                  c - math.sin(math.pi - self.margin) * self.margin)
        return self.scale * torch.where(onehot, with_margin, c)


class AdaCos(MarginHead):
    """(Sub-cluster) AdaCos; ``scale`` is a buffer, broadcast from rank 0 by DDP with the rest."""

    def __init__(self, dim: int, num_classes: int, subclusters: int = 1):
        super().__init__(dim, num_classes, subclusters)
        start = math.sqrt(2.0) * math.log(max(num_classes * subclusters - 1, 2))
        self.register_buffer("scale", torch.tensor(start))

    def logits(self, cos: Tensor, target: Tensor) -> Tensor:
        if self.training:
            s = self.scale
            with torch.no_grad():
                flat = cos.detach()
                onehot = F.one_hot(target, self.num_classes).bool()
                # B_avg: mean over the batch of the summed exp-logits of the non-target classes
                others = torch.where(onehot[:, :, None], torch.zeros_like(flat), torch.exp(s * flat))
                b_avg = others.sum(dim=(1, 2)).mean()
                theta_true = torch.acos(self.class_cosine(flat)[onehot].clamp(-1 + 1e-7, 1 - 1e-7))
                med = torch.minimum(torch.full_like(theta_true[:1], math.pi / 4), theta_true.median().view(1))
                new = torch.log(b_avg.clamp(min=1e-6)) / torch.cos(med)
                if torch.isfinite(new).all():
                    self.scale.copy_(new.view(()))
        # a copy: the buffer changes in place on the next call (mixup's second target)
        return torch.logsumexp(self.scale.detach().clone() * cos, dim=-1)


def make_head(name: str, dim: int, num_classes: int, subclusters: int = 1, scale: float = 30.0,
              margin: float = 0.5) -> MarginHead:
    if name == "arcface":
        return ArcFace(dim, num_classes, subclusters, scale=scale, margin=margin)
    if name == "adacos":
        return AdaCos(dim, num_classes, subclusters)
    raise ValueError(f"head must be one of {HEADS}, got {name!r}")


__all__ = ["HEADS", "AdaCos", "ArcFace", "MarginHead", "make_head"]
