"""A detector as data: a :class:`Recipe` names everything one detector is made of.

Reading a recipe top to bottom is reading the detector:

* ``pretrain`` (optional): the transformer pre-trained self-supervised on the training clips
  (:mod:`asd.stages.pretrain`), or ``encoder``: an existing pre-trained encoder file used
  instead (one of ours, or a released BEATs checkpoint);
* ``labels`` (needed when ``models`` is not empty): how the training clips are labelled for
  classification: ``section`` (machine type and section only), ``domain`` (type, section and
  source or target: no attribute, for corpora of one section per type), ``real`` (the real attributes),
  ``pseudo`` (Ward clusters of ``clustered``: log-mel statistics or the pre-trained encoder's
  embeddings) or ``real_else_pseudo`` (real attributes where a type has them);
* ``models``: the encoders trained on those labels (:mod:`asd.stages.finetune`), each a
  fine-tuning config and its training config: a transformer fine-tuned from the recipe's
  pre-trained encoder, or a CNN trained from scratch (``model: cnn | mod``), one model or an
  ensemble trained in one run (``members``);
* ``embed``: what is embedded and scored: one entry (``logmel``, ``spectrum``, ``pretrained`` or a model's name)
  or several, fused (``fusion: score``: every member's own kNN distance, weighted and summed;
  ``embedding``: one kNN on the weighted concatenation). Each entry weighs ``weight`` (1 by
  default), split evenly over the members of an ensemble (:func:`members`), so each architecture
  counts once whatever its ensemble size;
* ``score``: the scoring rule the detector was chosen with (fields of
  :class:`asd.stages.score.ScoreConfig`: ``k``, ``normalize``, ``condense_source``, thresholds),
  over the job's scoring settings.

Where the artefacts go is decided by the recipe too, so recipes that define the same thing share
it: labels go to ``labels/<labels tag>`` (:meth:`Labels.tag_name`), models to ``models/<model
tag>`` (the fine-tuning config's ``tag``; ensemble member i > 0 to ``<tag>-m<i>``), the
embedding and the scores to ``embeddings/<name>`` and ``scores/<name>``. How recipes are run:
:mod:`asd.recipes.run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from asd.models.attribute import member_tag
from asd.stages.finetune import FinetuneConfig
from asd.stages.pretrain import PretrainConfig
from asd.stages.pseudo_label import LABEL_SOURCES, PseudoLabelConfig
from asd.training.loop import TrainConfig

LOGMEL, SPECTRUM, PRETRAINED = "logmel", "spectrum", "pretrained"  # embedding sources that are not trained models
FIXED_EMBEDDERS = {LOGMEL: "logmel_stats", SPECTRUM: "spectrum"}  # sources computed from the features alone
FIXED_SOURCES = tuple(FIXED_EMBEDDERS)
LABELS = ("section", "domain", "real", "pseudo", "real_else_pseudo")
CLUSTERED = (LOGMEL, PRETRAINED)
FUSIONS = ("score", "embedding")
SCORE_RULES = ("k", "condense_source", "normalize", "threshold_method", "threshold_q", "threshold_sample")
# embedder parameters by source kind (an entry's ``params`` override them)
ENCODER_PARAMS = {"layer": None, "device": "auto", "max_frames": 1024, "batch_size": 16}
SOURCE_PARAMS = {
    LOGMEL: {"deltas": False},
    SPECTRUM: {},
    # per-frequency-band mean and std over time: 3-5 points above mean pooling for pre-trained encoders
    # (benchmarks/results/pretrain.json); 2 x 8 bands x width dims
    PRETRAINED: {**ENCODER_PARAMS, "pool": "freq_meanstd"},
    "model": {**ENCODER_PARAMS, "pool": "mean"},  # the pooling a model's head was trained on
}


@dataclass
class Pretrain:
    """Self-supervised pre-training of the transformer (``pretrain``, ``train``)."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Labels:
    """How the training clips are labelled (see the module docstring). ``cluster``: Ward's
    settings for ``pseudo`` and ``real_else_pseudo``; ``tag``: the labels' folder name (None:
    :meth:`tag_name`)."""

    source: str = "pseudo"
    clustered: str = LOGMEL
    cluster: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    tag: str | None = None

    def __post_init__(self):
        if self.source not in LABELS:
            raise ValueError(f"labels.source must be one of {LABELS}, got {self.source!r}")
        if self.clustered not in CLUSTERED:
            raise ValueError(f"labels.clustered must be one of {CLUSTERED}, got {self.clustered!r}")

    @property
    def clusters(self) -> bool:
        return self.source in ("pseudo", "real_else_pseudo")

    def tag_name(self) -> str:
        """``labels/<this>``: the clustered representation for pseudo labels (``logmel``,
        ``pretrained``), ``<it>-real_else_pseudo``, or ``section`` / ``real``."""
        if self.tag:
            return self.tag
        if self.source == "pseudo":
            return self.clustered
        return f"{self.clustered}-{self.source}" if self.clusters else self.source

    def cluster_config(self) -> PseudoLabelConfig:
        """The pseudo-label stage's config, publishing the labels of ``source``."""
        source = self.source if self.source in LABEL_SOURCES else "pseudo"
        from dataclasses import replace

        return replace(self.cluster, label_source=source)


@dataclass
class Model:
    """One trained encoder, or an ensemble of ``finetune.members`` trained in one run.
    ``checkpoint``: an existing ``encoder.pt`` used instead of training (one member)."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | None = None

    @property
    def tags(self) -> list[str]:
        """``models/<tag>`` of every member."""
        if self.checkpoint:
            return []
        return [member_tag(self.finetune.tag, i) for i in range(self.finetune.members)]

    @property
    def from_pretrained(self) -> bool:
        """A transformer fine-tuned from the recipe's pre-trained encoder (no ``model`` and no
        ``init_checkpoint`` of its own)."""
        return self.finetune.model is None and not self.finetune.init_checkpoint


@dataclass
class EmbedEntry:
    """One member of a recipe's embedding: ``source`` (``logmel``, ``spectrum``, ``pretrained`` or a model's
    name), the first ``members`` members of an ensemble (None: all), its ``weight`` and embedder
    ``params`` over the defaults of its kind (:data:`SOURCE_PARAMS`)."""

    source: str = LOGMEL
    members: int | None = None
    weight: float = 1.0
    params: dict = field(default_factory=dict)


@dataclass
class Recipe:
    """A detector (see the module docstring)."""

    name: str = "logmel"
    title: str = ""  # one line for reports
    pretrain: Pretrain | None = None
    encoder: str | None = None  # an existing pre-trained encoder, used instead of pre-training
    labels: Labels | None = None
    models: dict[str, Model] = field(default_factory=dict)
    embed: list[EmbedEntry] = field(default_factory=lambda: [EmbedEntry()])
    fusion: str = "score"
    score: dict = field(default_factory=dict)  # its scoring rule over the job's ScoreConfig (SCORE_RULES)

    def __post_init__(self):
        where = f"recipe {self.name!r}"
        unknown = sorted(set(self.score) - set(SCORE_RULES))
        if unknown:
            raise ValueError(f"{where}: score sets {unknown}; a recipe's scoring rule is one of {SCORE_RULES}")
        if not self.embed:
            raise ValueError(f"{where}: embed lists nothing to score")
        if self.fusion not in FUSIONS:
            raise ValueError(f"{where}: fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.pretrain is not None and self.encoder:
            raise ValueError(f"{where}: give pretrain or encoder, not both")
        if self.models and self.labels is None:
            raise ValueError(f"{where}: models need labels")
        clusters_pretrained = self.labels is not None and self.labels.clusters and self.labels.clustered == PRETRAINED
        needs_pretrained = (any(e.source == PRETRAINED for e in self.embed) or clusters_pretrained
                            or any(m.from_pretrained and not m.checkpoint for m in self.models.values()))
        if needs_pretrained and self.pretrain is None and not self.encoder:
            raise ValueError(f"{where}: needs a pre-trained encoder (pretrain or encoder)")
        for e in self.embed:
            if e.source not in (*FIXED_SOURCES, PRETRAINED) and e.source not in self.models:
                raise ValueError(f"{where}: embed source {e.source!r} is neither {', '.join(FIXED_SOURCES)}, "
                                 f"pretrained nor one of its models {sorted(self.models)}")
            if e.weight <= 0 or (e.members is not None and e.members < 1):
                raise ValueError(f"{where}: embed {e.source}: weight must be > 0 and members >= 1")


def source_member(source: str, pretrained: str | None = None, params: dict | None = None, weight: float = 1.0) -> dict:
    """The embedder member of ``logmel``, ``spectrum`` or ``pretrained`` (``pretrained``: the encoder file)."""
    if source in FIXED_SOURCES:
        return {"embedder": FIXED_EMBEDDERS[source], "params": {**SOURCE_PARAMS[source], **(params or {})},
                "weight": weight}
    return {"embedder": "encoder", "params": {**SOURCE_PARAMS[PRETRAINED], **(params or {}), "checkpoint": pretrained},
            "weight": weight}


def members(recipe: Recipe, encoders: dict[str, list[str]], pretrained: str | None) -> list[dict]:
    """The recipe's embedding as embedder members ``{"embedder", "params", "weight"}``: each entry's
    members (``encoders`` of its model, the first ``entry.members`` of them) share its weight
    evenly. ``pretrained``: the pre-trained encoder's file (for ``pretrained`` entries)."""
    out = []
    for e in recipe.embed:
        if e.source in (*FIXED_SOURCES, PRETRAINED):
            out.append(source_member(e.source, pretrained, e.params, e.weight))
            continue
        files = encoders[e.source][: e.members] if e.members else encoders[e.source]
        for f in files:
            out.append({"embedder": "encoder", "params": {**SOURCE_PARAMS["model"], **e.params, "checkpoint": f},
                        "weight": e.weight / len(files)})
    return out


def embedder(members_: list[dict], fusion: str = "score") -> tuple[str, dict]:
    """(embedder name, params) of an embedding of ``members_``: the one member's own embedder, or
    ``concat`` of several with ``fusion``."""
    if len(members_) == 1:
        return members_[0]["embedder"], dict(members_[0]["params"])
    return "concat", {"members": members_, "fusion": fusion}


__all__ = ["CLUSTERED", "EmbedEntry", "FIXED_EMBEDDERS", "FIXED_SOURCES", "LABELS", "LOGMEL", "Labels", "Model",
           "PRETRAINED", "Pretrain", "Recipe", "SCORE_RULES", "SOURCE_PARAMS", "SPECTRUM", "embedder", "members",
           "source_member"]
