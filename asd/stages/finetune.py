"""Supervised training for machine attribute classification, on :mod:`asd.training.fit`.

An encoder learns to tell apart the classes ``(machine type, section, attribute label)`` of the
normal training clips, where the attribute label is a pseudo label from
:mod:`asd.stages.pseudo_label` (or a real one): a pre-trained transformer fine-tuned from
``init_checkpoint`` (a recipe's pre-trained encoder, or any encoder file), or a CNN trained from
scratch (``model: cnn | mod``, :mod:`asd.models.registry`).
The pooled encoder output (``pool``, ``layer``) is the embedding that scoring uses later, and
the margin head (:mod:`asd.models.heads`: ArcFace, AdaCos, sub-cluster AdaCos) sits directly on
it, so the exported encoder gives exactly the space the classes were separated in.

Per micro-batch (:class:`AttributeObjective`): SpecAugment-style time and frequency masks on
the normalised crops, mixup (``mixup_prob`` of the batches, ``lam ~ Beta(a, a)``, the loss
mixed with the same ``lam``), then the head's loss; accuracy of the unmixed targets is logged.
Statistics exchange (``statex_prob > 0``, StatEx from Wilkinghoff's self-supervised ASD systems):
that share of a batch's clips is replaced by the clip's rows (log-mel frames, or modulation bins)
standardised over their feature axis (mel bins, or the bands) and given another clip's per-row
mean and standard deviation, and classified with half its own class and half its partner's, in two
extra blocks of classes (the head has 3 x the classes); the encoder must tell a clip's detail from
its level envelope. Off in the schema; the served CNNs (``jobs/conf/finetune/cnn.yaml``,
``mod.yaml``) set 0.5.
Class-balanced sampling (``balance``): every clip gets a weight ``count(group) ** -power``
(``group`` = its class, or its type/section/domain), normalised to mean 1, and
:class:`asd.training.batches.FeatureBatches` samples by these weights, so the ~10 target-domain clips of a
DCASE section are drawn about as often as the ~990 source clips.

Ensembles in one run (``members > 1``): that many independent models (encoder + head) train
side by side in one training run. Each step reads ``members`` batches of ``train.batch_size``
clips at once and member i trains on the i-th, with its own initialisation and mixup draws;
their losses add up and each model's gradient is clipped on its own, so every member trains as
a run of its own would, on its own stream of clips. (Five modulation CNNs on development seed 10,
mean of their kNN scores: five separate runs 60.14 %, one run sharing each batch 58.88 % (the
members too alike), one run with a batch each 59.76 %; on seed 11 the last gives 61.11 %.) Export writes one encoder per member, ``models/<tag>`` and
``models/<tag>-m<i>`` (:func:`member_tag`). One run instead of one per member saves a training
run's start-up each (about 25 s on 2 cores).

Weight averaging (``ema_decay > 0``): after every optimizer step ``average = d * average + (1 - d) *
weights`` (:func:`asd.training.loop.ema_update`, BatchNorm statistics included, every member); the average
is kept in the checkpoint's objective state and is what export writes. Off by default.

Encoder adaptation: all weights (default), the first ``freeze_layers`` blocks and the patch
embedding frozen, or low-rank adapters (``lora_rank > 0``: ``W + (alpha / r) B A`` on the
``lora_targets`` projections of every attention block, everything else in the encoder frozen).
Adapters are merged into the weights on export, so ``models/<tag>/encoder.pt`` is a plain
:class:`~asd.models.encoder.AudioEncoder` that loads strictly and embeds at full speed.

Labels come from the folder ``labels`` (:func:`asd.stages.pseudo_label.pseudo_label` or
:func:`~asd.stages.pseudo_label.attribute_labels`; a recipe passes its own);
``label_column`` picks ``label`` (the clustering stage's choice of pseudo or real),
``pseudo_label`` or ``real_label`` (real attributes from the manifest; a type without any is
classified by type and section alone). The clip -> class table travels to the workers inside
the objective (about 60 bytes a clip: 1M clips ~ 60 MB), so the feature rows need no join.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from asd.io import storage
from asd.models import modnet
from asd.models.attribute import AttributeModel, EnsembleModel, member_tag, merge_lora
from asd.models.encoder import FBANK_MEAN, FBANK_STD, POOLS, EncoderConfig
from asd.models.heads import HEADS
from asd.models.registry import SCRATCH, config_from_dict, load_checkpoint
from asd.training.augment import spec_augment, statistics_exchange
from asd.training.checkpoints import export_encoders
from asd.training.fit import StageResult, TrainResult, fit, stage_train_config
from asd.training.loop import ObjectiveBase, TrainConfig, ema_update, unwrap

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("label", "pseudo_label", "real_label")
IDENTITY_NORM = (0.0, 0.5)  # (x - mean) / (2 std) = x: for inputs the model normalises itself


class SingleClassError(ValueError):
    """The labels give one class only (e.g. real attributes on a corpus with one attribute value)."""

BALANCE = ("class", "domain", "none")


@dataclass
class FinetuneConfig:
    tag: str = "finetune"  # models/<tag>/encoder.pt; also the Ray Train run name by default
    init_checkpoint: str | None = None  # the encoder a transformer is fine-tuned from (a recipe: its pre-trained one)
    # "cnn": train asd.models.cnn.CNNEncoder (log-mel) from scratch; "mod": asd.models.modnet.ModEncoder
    # (the modulation spectrum); None: fine-tune init_checkpoint
    model: str | None = None
    model_cfg: dict = field(default_factory=dict)  # CNNConfig / ModConfig fields (channels, embed_dim, ...)
    labels: str | None = None  # the labels folder (a recipe: its labels)
    label_column: str = "label"  # label | pseudo_label | real_label
    head: str = "adacos"  # adacos | arcface
    subclusters: int = 1  # > 1 with adacos: sub-cluster AdaCos
    scale: float = 30.0  # arcface
    margin: float = 0.5  # arcface, radians
    pool: str = "mean"
    layer: int | None = None  # block whose output is pooled (None: the last)
    freeze_layers: int = 0  # patch embedding + the first N blocks frozen (ignored with LoRA)
    lora_rank: int = 0  # > 0: low-rank adapters instead of full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    time_masks: int = 2  # SpecAugment on the crop (frames)
    time_mask_width: int = 24
    freq_masks: int = 2
    freq_mask_width: int = 12
    mixup_alpha: float = 0.2
    mixup_prob: float = 0.5
    # > 0: that share of each batch's clips takes every row's mean and std over the feature axis (frames
    # over mel bins; modulation bins over bands) from another clip of the batch (statistics exchange, Wilkinghoff's StatEx) and is classified into new classes
    # (clip's class, partner's class): the head has 3 x the classes. 0: off
    statex_prob: float = 0.0
    balance: str = "class"  # class | domain (type/section/domain) | none
    balance_power: float = 1.0  # weight = count ** -power (1: fully balanced, 0.5: square root)
    members: int = 1  # > 1: that many independent models trained side by side in one run (an ensemble)
    ema_decay: float = 0.0  # > 0: export the moving average of the weights (and BatchNorm statistics), not the last

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.label_column not in LABEL_COLUMNS:
            raise ValueError(f"label_column must be one of {LABEL_COLUMNS}, got {self.label_column!r}")
        if self.balance not in BALANCE:
            raise ValueError(f"balance must be one of {BALANCE}, got {self.balance!r}")
        if self.subclusters < 1 or self.members < 1 or self.lora_rank < 0 or self.freeze_layers < 0:
            raise ValueError("subclusters and members must be >= 1, lora_rank and freeze_layers >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if not 0.0 <= self.statex_prob < 1.0:
            raise ValueError(f"statex_prob must be in [0, 1) (0: off), got {self.statex_prob}")
        if not 0.0 <= self.mixup_prob <= 1.0:
            raise ValueError(f"mixup_prob must be in [0, 1], got {self.mixup_prob}")
        if self.model not in SCRATCH and self.model is not None:
            raise ValueError(f"model must be None (fine-tune init_checkpoint) or one of {sorted(SCRATCH)}, "
                             f"got {self.model!r}")
        if self.model is not None:
            if self.init_checkpoint:
                raise ValueError(f"model={self.model!r} trains from scratch; init_checkpoint must be null")
            if self.lora_rank or self.freeze_layers or self.layer is not None or self.pool != "mean":
                raise ValueError(f"model={self.model!r}: lora_rank, freeze_layers and layer do not apply and pool "
                                 "must be 'mean' (the CNN has one embedding)")
            config_from_dict(self.model, dict(self.model_cfg))  # unknown keys fail here, before any work


@dataclass
class FinetuneResult(StageResult):
    """:class:`asd.training.fit.StageResult` of fine-tuning, with the classes and training accuracy."""

    encoders: list[str] = field(default_factory=list)  # one per member (``encoder`` is the first)
    num_classes: int = 0
    n_clips: int = 0
    final_accuracy: float | None = None
    first_accuracy: float | None = None


# ----------------------------------------------------------------------------- objective


class AttributeObjective(ObjectiveBase):
    """Attribute classification with a margin loss (see the module docstring)."""

    name = "finetune"
    columns = ("clip_id",)
    find_unused_parameters = False

    def __init__(self, fcfg: FinetuneConfig, encoder_cfg: EncoderConfig, classes: list[str],
                 clip_class: dict[str, int], clip_weight: dict[str, float] | None = None,
                 init_checkpoint: str | None = None):
        self.fcfg = fcfg
        self.encoder_cfg = encoder_cfg
        self.classes = list(classes)
        self.clip_class = dict(clip_class)
        self.clip_weight = dict(clip_weight or {})
        self.init_checkpoint = init_checkpoint
        self.input = modnet.INPUT if isinstance(encoder_cfg, modnet.ModConfig) else "fbank"
        # layer drop skips other blocks on every rank and step: DDP must look for unused parameters
        self.find_unused_parameters = getattr(encoder_cfg, "encoder_layerdrop", 0.0) > 0
        self.average: nn.Module | None = None  # ema_decay > 0: the weight average (setup), exported

    def __getstate__(self):  # ship the configuration only, never a weight average
        return {**self.__dict__, "average": None}

    def build(self) -> nn.Module:
        def one() -> AttributeModel:
            return AttributeModel(self.encoder_cfg, len(self.classes), self.fcfg)
        return one() if self.fcfg.members == 1 else EnsembleModel(self.fcfg.members, one)

    @staticmethod
    def _members(module: nn.Module) -> list[AttributeModel]:
        module = unwrap(module)
        return list(module.members) if isinstance(module, EnsembleModel) else [module]

    def clip_groups(self, module: nn.Module) -> list[list[nn.Parameter]]:
        return [list(m.parameters()) for m in self._members(module)]

    def setup(self, module: nn.Module, device: torch.device) -> None:
        if self.fcfg.ema_decay > 0:  # after initialize(): the average starts from the initial weights
            self.average = copy.deepcopy(unwrap(module)).to(device).eval()
            for p in self.average.parameters():
                p.requires_grad_(False)

    def after_optimizer_step(self, module: nn.Module, step: int, total_steps: int) -> dict | None:
        if self.average is not None:
            ema_update(self.average, unwrap(module), self.fcfg.ema_decay, buffers=True)
        return None

    def state_dict(self) -> dict:
        if self.average is None:
            return {}
        return {"average": {k: v.detach().cpu() for k, v in self.average.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("average")
        if (saved is None) != (self.average is None):  # never export a fresh average or drop a saved one
            raise RuntimeError(f"the checkpoint {'holds no' if saved is None else 'holds a'} weight average but "
                               f"ema_decay is {self.fcfg.ema_decay}: resume or export with the run's own setting")
        if saved is not None:
            self.average.load_state_dict(saved)

    def initialize(self, module: nn.Module) -> None:
        if not self.init_checkpoint:
            return
        src = load_checkpoint(self.init_checkpoint, keep_predictor=False).state_dict()
        for m in self._members(module):
            missing, unexpected = m.encoder.load_state_dict(src, strict=False)
            missing = [k for k in missing if ".lora_" not in k]
            if missing or unexpected:
                raise ValueError(f"{self.init_checkpoint}: does not match the fine-tuning encoder "
                                 f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})")
        log.info("fine-tuning from %s", self.init_checkpoint)

    def sample_weights(self, extras: list[dict]) -> np.ndarray:
        if not self.clip_weight:
            return np.array([1.0 if e["clip_id"] in self.clip_class else 0.0 for e in extras])
        return np.array([self.clip_weight.get(e["clip_id"], 0.0) for e in extras])

    def step(self, model: nn.Module, batch: dict, step: int) -> tuple[Tensor, dict]:
        fbank = batch["fbank"]
        y = torch.tensor([self.clip_class.get(c, -1) for c in batch["clip_id"]])  # on the host: no device sync
        keep = y >= 0
        if not bool(keep.all()):  # clips featurized after the labels were made: not trained on
            fbank, y = fbank[keep.to(fbank.device)], y[keep]
        y = y.to(fbank.device, non_blocking=True)
        if fbank.shape[0] == 0:
            raise RuntimeError("a training batch had no labelled clip: are the labels from these features?")
        x = spec_augment(fbank, self.fcfg)
        rng = np.random.default_rng(step)
        n = self.fcfg.members
        # an ensemble's batch holds one batch per member (finetune() scales train.batch_size): member i
        # trains on chunk i, so every member sees its own stream of clips, as a run of its own would
        chunks = list(zip(x.tensor_split(n), y.tensor_split(n)))
        if min(len(c[1]) for c in chunks) < 2:  # a short last batch: every member takes all of it
            chunks = [(x, y)] * n
        inputs, targets = [], []
        for xi, yi in chunks:  # each member its own statistics exchange and mixup draws
            xi, yi, exchanged = self._exchange_statistics(xi, yi)
            y_b, lam = None, 1.0
            if self.fcfg.mixup_alpha > 0 and xi.shape[0] > 1 and float(torch.rand(())) < self.fcfg.mixup_prob:
                lam = float(rng.beta(self.fcfg.mixup_alpha, self.fcfg.mixup_alpha))
                perm = torch.randperm(xi.shape[0], device=xi.device)
                xi, y_b = lam * xi + (1.0 - lam) * xi[perm], yi[perm]
            inputs.append(xi if exchanged is None else torch.cat([xi, exchanged[0]]))
            targets.append((yi, y_b, lam, exchanged))
        outs = [model(inputs[0])] if n == 1 else model(inputs)
        heads = [m.head for m in self._members(model)]
        loss = 0.0
        for head, (_, cos), (yi, y_b, lam, exchanged) in zip(heads, outs, targets):
            k = len(yi)
            term = head.loss(cos[:k].float(), yi, y_b, lam)
            if exchanged is not None:  # half the own content's class, half the partner's statistics' class
                m = len(exchanged[1])
                term = (k * term + m * head.loss(cos[k:].float(), exchanged[1], exchanged[2], 0.5)) / (k + m)
            loss = loss + term
        with torch.no_grad():
            acc = torch.stack([(head.class_cosine(cos[:len(yi)]).argmax(dim=1) == yi).float().mean()
                               for head, (_, cos), (yi, *_) in zip(heads, outs, targets)]).mean()
        logs = {"acc": acc, "mixup_lam": targets[0][2]}  # device scalars: read at log steps only
        if hasattr(heads[0], "scale") and isinstance(heads[0].scale, Tensor):
            logs["scale"] = heads[0].scale.detach()
        return loss, logs

    def _exchange_statistics(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, tuple | None]:
        """Statistics exchange on one member's batch: the clips it leaves as they are, their classes,
        and ``(exchanged inputs, own classes, partner classes)`` for the rest (None when off or
        when the draw picks none or all of the batch)."""
        if self.fcfg.statex_prob <= 0 or x.shape[0] <= 2:
            return x, y, None
        pick = torch.rand(x.shape[0]) < self.fcfg.statex_prob
        n_ex = int(pick.sum())
        if not 0 < n_ex < x.shape[0]:
            return x, y, None
        idx = pick.nonzero().squeeze(1)
        partner = torch.randint(0, x.shape[0] - 1, (n_ex,))
        partner = (partner + (partner >= idx).long()).to(x.device)  # never the clip itself
        idx, keep = idx.to(x.device), (~pick).nonzero().squeeze(1).to(x.device)
        c = len(self.classes)  # classes [original | as a clip's own content | as a partner's statistics]
        exchanged = (statistics_exchange(x[idx], x[partner]), c + y[idx], 2 * c + y[partner])
        return x[keep], y[keep], exchanged

    def encoder(self, module: nn.Module, member: int = 0) -> nn.Module:
        module = self._members(self.average if self.average is not None else module)[member]
        enc = merge_lora(module.encoder) if self.fcfg.lora_rank > 0 else module.encoder
        for p in enc.parameters():
            p.requires_grad_(True)
        return enc

    def describe(self) -> dict:
        return {"objective": self.name, "finetune": asdict(self.fcfg), "num_classes": len(self.classes),
                "classes": self.classes[:1000]}


# ----------------------------------------------------------------------------- labels


def class_key(machine_type: str, section: str | None, value: str | None) -> str:
    return f"{machine_type}/{section if section is not None else '-'}/{value if value is not None else '-'}"


def load_labels(labels_uri: str, label_column: str = "label", balance: str = "class",
                power: float = 1.0) -> tuple[list[str], dict[str, int], dict[str, float], dict]:
    """(classes, clip -> class index, clip -> sampling weight (mean 1), summary) from a labels folder."""
    storage.require_published(labels_uri)
    table = storage.read_table(storage.join(labels_uri, "labels.parquet"))
    if label_column not in table.column_names:
        raise ValueError(f"{labels_uri}: no column {label_column!r} (has {table.column_names})")
    rows = table.select(["clip_id", "machine_type", "section", "domain", label_column]).to_pylist()
    if not rows:
        raise ValueError(f"{labels_uri}: no labelled clips")
    keys = [class_key(r["machine_type"], r["section"], None if r[label_column] is None else str(r[label_column]))
            for r in rows]
    classes = sorted(set(keys))
    index = {k: i for i, k in enumerate(classes)}
    clip_class = {r["clip_id"]: index[k] for r, k in zip(rows, keys)}
    if balance == "none":
        groups = ["all"] * len(rows)
    elif balance == "class":
        groups = keys
    else:
        groups = [f"{r['machine_type']}/{r['section']}/{r['domain']}" for r in rows]
    counts = Counter(groups)
    w = np.array([counts[g] ** -power for g in groups], np.float64)
    w *= len(w) / w.sum()
    clip_weight = {r["clip_id"]: float(x) for r, x in zip(rows, w)}
    per_class = Counter(keys)
    summary = {"n_clips": len(rows), "num_classes": len(classes), "label_column": label_column,
               "smallest_class": min(per_class.values()), "largest_class": max(per_class.values()),
               "n_types": len({r["machine_type"] for r in rows})}
    if len(classes) < 2:
        raise SingleClassError(f"{labels_uri}: {label_column!r} gives only one class ({classes[0]}); "
                               "classification needs at least two")
    return classes, clip_class, clip_weight, summary


# ----------------------------------------------------------------------------- stage


def finetune(features_root: str, out_root: str | None = None, fcfg: FinetuneConfig | None = None,
             tcfg: TrainConfig | None = None) -> FinetuneResult:
    """Fine-tune on ``<features_root>/features`` with the labels of ``fcfg.labels``; export to
    ``<out_root>/models/<tag>/encoder.pt``. Checkpoints under ``tcfg.storage_path`` (default
    ``<out_root>/checkpoints``), run name ``tcfg.name`` (default: the tag); a rerun continues."""
    fcfg = fcfg or FinetuneConfig()
    tcfg = tcfg or TrainConfig()
    out_root = out_root or features_root
    tcfg = stage_train_config(tcfg, fcfg.tag, out_root)
    if fcfg.members > 1:  # train.batch_size is per member: each step reads one batch for every member
        tcfg = replace(tcfg, batch_size=tcfg.batch_size * fcfg.members)
    t0 = time.perf_counter()
    if fcfg.model is not None:  # from scratch: a new encoder of that architecture
        init, encoder_cfg = None, config_from_dict(fcfg.model, dict(fcfg.model_cfg))
        # the modulation CNN standardises its own input; log-mel models take the default normalisation
        norm = IDENTITY_NORM if fcfg.model == modnet.ARCH else (FBANK_MEAN, FBANK_STD)
        if fcfg.model == modnet.ARCH and tcfg.crop_frames != encoder_cfg.bins:
            raise ValueError(f"model=mod takes whole modulation spectra: train.crop_frames must be "
                             f"{encoder_cfg.bins} (model_cfg.bins), got {tcfg.crop_frames}")
    else:
        if not fcfg.init_checkpoint:
            raise ValueError(f"{fcfg.tag}: fine-tuning a transformer needs init_checkpoint (the pre-trained encoder); "
                             "a recipe sets it to its own pre-trained encoder")
        init = storage.absolute(fcfg.init_checkpoint)
        if not storage.exists(init):
            raise FileNotFoundError(f"no encoder to fine-tune at {init} (run pretrain, or set init_checkpoint)")
        start = load_checkpoint(init, keep_predictor=False)
        meta = start.meta or {}
        norm = (float(meta.get("norm_mean", FBANK_MEAN)), float(meta.get("norm_std", FBANK_STD)))
        encoder_cfg = start.cfg
        del start
    if not fcfg.labels:
        raise ValueError(f"{fcfg.tag}: no labels folder (a recipe's labels, or the pseudo_label stage's output)")
    labels = fcfg.labels
    classes, clip_class, clip_weight, summary = load_labels(labels, fcfg.label_column, fcfg.balance,
                                                            fcfg.balance_power)
    log.info("fine-tuning %s (%s) on %d clips, %d classes (%s, sizes %d..%d) from %s", fcfg.tag,
             init or f"{fcfg.model} from scratch", summary["n_clips"], len(classes), fcfg.label_column,
             summary["smallest_class"], summary["largest_class"], labels)
    objective = AttributeObjective(fcfg, encoder_cfg, classes, clip_class, clip_weight, init_checkpoint=init)
    res: TrainResult = fit(objective, features_root, tcfg, norm=norm)
    if res.checkpoint is None:
        raise RuntimeError(f"training run {res.run} produced no checkpoint")
    export_meta = {"stage": "finetune", "tag": fcfg.tag, "features_root": features_root, "labels": labels,
                   "norm_mean": norm[0], "norm_std": norm[1], "crop_frames": tcfg.crop_frames,
                   "train_steps": res.step, "init_checkpoint": init, "label_summary": summary}
    tags = [member_tag(fcfg.tag, i) for i in range(fcfg.members)]
    uris = export_encoders(objective, res.checkpoint, out_root, tags,
                           [{**export_meta, "tag": t, "member": i, "members": fcfg.members} for i, t in enumerate(tags)])
    uri = uris[0]
    accs = [h["acc"] for h in res.history if "acc" in h]
    log.info("fine-tuned %s for %d steps (loss %s, accuracy %s): %s", fcfg.tag, res.step, res.final_loss,
             accs[-1] if accs else None, ", ".join(uris))
    return FinetuneResult(
        checkpoint=res.checkpoint, run=res.run, encoder=uri, encoders=uris, num_classes=len(classes),
        n_clips=summary["n_clips"], final_loss=res.final_loss, final_accuracy=accs[-1] if accs else None,
        first_accuracy=accs[0] if accs else None, steps=res.step, start_step=res.start_step,
        seconds=time.perf_counter() - t0, samples_per_s=res.samples_per_s, train=res.to_dict(history=True),
    )


__all__ = [
    "AttributeObjective",
    "FinetuneConfig",
    "FinetuneResult",
    "SingleClassError",
    "class_key",
    "finetune",
    "load_labels",
]
