"""Side-by-side accuracy of several methods on the same data and the same split, in one run.

:func:`evaluate` featurizes a DCASE-layout corpus (local or ``s3://``) once per front end the
chosen methods need, fixes one train/test split (:func:`plan_split`), runs every method on it,
writes each method's scores like the scoring stage (``<root>/scores/<method>/``: scores.parquet,
DCASE CSVs, metrics.json, report.md, plots) and one comparison report
``<root>/evaluate/report.{md,json,png}``: AUC-source, AUC-target and pAUC per machine type and
the official score (harmonic mean) per method, with the run's configuration and data checksums.

Methods are entries of :data:`METHODS` (:func:`register_method`): a name, the front ends it
needs, an optional prerequisite check (a missing prerequisite stops the run before any work,
with a message naming what is missing) and a function from the run's :class:`EvalContext` to a
score table in :data:`asd.score.SCORE_SCHEMA`. Built in:

* ``ae_mse``, ``ae_mahalanobis``: the official DCASE autoencoder baseline
  (:mod:`asd.baselines.autoencoder`; one training serves both scores);
* ``logmel_knn``: cosine kNN on log-mel statistics (:mod:`asd.embed`, :mod:`asd.score`);
* ``pretrained_knn``: kNN on a self-supervised encoder, pre-trained in this run on the
  training split (``pretrained.checkpoint`` uses an existing encoder instead);
* ``finetuned_knn``: kNN on the encoder fine-tuned in this run the way the pipeline does it:
  the pre-trained encoder (``pretrained_knn``'s) embeds the training split, Ward clustering
  gives pseudo-attribute labels (``finetuned.cluster``), and attribute classification fine-tunes
  it (``finetuned.finetune``, :mod:`asd.finetune`); ``finetuned.checkpoint`` uses an existing
  fine-tuned encoder instead.

**The split** is :func:`asd.split.plan_split`'s (see there): decided once, the same for every
method. Every method's scored clips are checked to be exactly the test set (no training or bank
clip, none missing); the report carries the data and split checksums."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd import commitlog, layout, metrics, report, storage
from asd.baselines.autoencoder import AEConfig, default_train_config
from asd.embed import EmbedConfig
from asd.features import KEY_COLUMNS, read_features_table
from asd.featurize import FeaturizeConfig
from asd.finetune import FinetuneConfig, SingleClassError
from asd.loop import TrainConfig
from asd.pretrain import PretrainConfig
from asd.score import SCORE_SCHEMA, ScoreConfig
from asd.split import EXCLUDED, TEST, TRAIN, SplitPlan, data_sha256, plan_split
from asd.ward import ClusterConfig

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("ae_mse", "ae_mahalanobis", "logmel_knn", "pretrained_knn", "finetuned_knn")
LOGMEL, AE = "logmel", "ae"  # the two front ends: the stored Kaldi features, the baseline's own


# ----------------------------------------------------------------------------- config


@dataclass
class EmbedMethodConfig:
    """A kNN method on an embedding: ``embeddings/<tag>`` made with ``embed``."""

    tag: str = "logmel"
    embed: EmbedConfig = field(default_factory=EmbedConfig)


@dataclass
class EncoderMethodConfig:
    """A kNN method on an encoder's embedding. ``checkpoint``: an ``encoder.pt`` (local or s3://);
    None pre-trains one in this run with ``pretrain``/``pretrain_train`` where the method allows it."""

    tag: str = "eval-pretrained"
    checkpoint: str | None = None
    embed: EmbedConfig = field(default_factory=lambda: EmbedConfig(embedder="encoder"))
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(tag="eval-pretrain", model="tiny"))
    pretrain_train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FinetunedMethodConfig(EncoderMethodConfig):
    """``checkpoint`` None: fine-tune in this run (pseudo labels by ``cluster`` of the pre-trained
    encoder's training-split embeddings, then ``finetune``/``finetune_train``)."""

    tag: str = "eval-finetuned"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(tag="eval-finetune"))
    finetune_train: TrainConfig = field(default_factory=TrainConfig)


CNN_LABELS = ("section", "pseudo", "real", "real_else_pseudo")


@dataclass
class CNNMethodConfig:
    """kNN on a CNN encoder trained from scratch in this run to classify (machine type, section,
    attribute) classes of the training split (``finetune.model`` must be ``cnn``). The attribute
    per method: ``cnn_section`` none (type and section only), ``cnn_pseudo`` Ward pseudo labels of
    ``cluster_embed``'s embeddings of the training split for every type, ``cnn_real`` the real
    attributes where a type has them, ``cnn_real_else_pseudo`` real attributes where a type has
    them and pseudo labels elsewhere. ``checkpoint`` embeds with a given encoder.pt instead."""

    tag: str = "eval-cnn"
    checkpoint: str | None = None
    cluster_embed: str = "logmel"  # logmel | pretrained: the representation clustered into pseudo labels
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(tag="eval-cnn", model="cnn"))
    finetune_train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=lambda: EmbedConfig(embedder="encoder", params={"pool": "mean"}))

    def __post_init__(self):
        if self.cluster_embed not in ("logmel", "pretrained"):
            raise ValueError(f"cnn.cluster_embed must be logmel or pretrained, got {self.cluster_embed!r}")
        if self.finetune.model != "cnn":
            raise ValueError("cnn.finetune.model must be 'cnn' (the CNN is trained from scratch)")


@dataclass
class ModMethodConfig:
    """The modulation-spectrum CNN (:mod:`asd.models.modnet`, ``finetune.model`` must be ``mod``)
    trained from scratch in this run on the same Ward pseudo labels as ``cnn_pseudo``:
    ``mod_pseudo`` scores its embedding alone; ``fused_pseudo`` (the served recipe) fuses the
    ``cnn.finetune.members`` log-mel CNNs and the ``finetune.members`` modulation CNNs (each
    ensemble trained in one run, :class:`asd.finetune.FinetuneConfig`; the first member of each
    is ``cnn_pseudo``'s and ``mod_pseudo``'s) with the ``concat`` embedder: ``fusion`` score (each
    member's kNN distance, summed with weight 1/members within its architecture, so each
    architecture weighs the same) or embedding."""

    tag: str = "eval-mod"
    fusion: str = "score"
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(tag="eval-mod", model="mod"))
    finetune_train: TrainConfig = field(default_factory=lambda: TrainConfig(crop_frames=256))
    embed: EmbedConfig = field(default_factory=lambda: EmbedConfig(embedder="encoder", params={"pool": "mean"}))
    fused_tag: str = "eval-fused"

    def __post_init__(self):
        if self.finetune.model != "mod":
            raise ValueError("mod.finetune.model must be 'mod' (the modulation CNN is trained from scratch)")
        if self.fusion not in ("embedding", "score"):
            raise ValueError(f"mod.fusion must be embedding or score, got {self.fusion!r}")


@dataclass
class EvaluateConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    derive_fraction: float = 0.5  # share of a section's normal test clips that forms a missing train split
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    ae_train: TrainConfig = field(default_factory=default_train_config)
    logmel: EmbedMethodConfig = field(default_factory=EmbedMethodConfig)
    pretrained: EncoderMethodConfig = field(default_factory=EncoderMethodConfig)
    finetuned: FinetunedMethodConfig = field(default_factory=FinetunedMethodConfig)
    cnn: CNNMethodConfig = field(default_factory=CNNMethodConfig)
    mod: ModMethodConfig = field(default_factory=ModMethodConfig)
    served_method: str | None = None  # the method that is the pipeline's default recipe (named in the report)
    plots: bool = True  # per-method ROC and histogram plots

    def __post_init__(self):
        self.methods = tuple(self.methods)
        if self.served_method is not None and self.served_method not in METHODS:
            raise ValueError(f"served_method {self.served_method!r} is not a method; known: {sorted(METHODS)}")
        if not 0.0 < self.derive_fraction < 1.0:
            raise ValueError(f"derive_fraction must be in (0, 1), got {self.derive_fraction}")


# ----------------------------------------------------------------------------- methods


@dataclass
class EvalContext:
    """What a method sees: the corpus, the run root, the config, the split, and a cache shared by
    methods of one run (e.g. one autoencoder training serves both of its scores)."""

    input: str
    root: str
    cfg: EvaluateConfig
    plan: SplitPlan | None = None
    cache: dict = field(default_factory=dict)

    def once(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]


@dataclass
class MethodOutput:
    scores: pa.Table  # asd.score.SCORE_SCHEMA, the test clips
    thresholds: dict  # (machine_type, section) -> decision threshold
    info: dict = field(default_factory=dict)


@dataclass
class Method:
    name: str
    title: str
    features: tuple[str, ...]  # front ends: LOGMEL and/or AE
    run: Callable[[EvalContext], MethodOutput]
    check: Callable[[EvalContext], str | None] = lambda ctx: None  # a missing prerequisite, or None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add (or replace) a method under its name."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def _ae_scores(ctx: EvalContext) -> dict:
    from asd.baselines.autoencoder import score_autoencoders, train_autoencoders

    trained = train_autoencoders(layout.ae_root(ctx.root), ctx.root, ctx.cfg.ae, ctx.cfg.ae_train,
                                 train_clips=sorted(ctx.plan.train_ids))
    scored = score_autoencoders(layout.ae_root(ctx.root), trained.models, sorted(ctx.plan.test_ids), cfg=ctx.cfg.ae)
    info = {"models": trained.models, "maha_reduction": ctx.cfg.ae.maha_reduction,
            "training": {k: v for k, v in trained.training.items() if k != "loss_history"},
            "loss_history": trained.training.get("loss_history"),
            "per_type": {mt: {k: v for k, v in d.items() if k in ("train_clips", "train_clips_source", "train_clips_target",
                                                                   "target_covariance", "thresholds", "offset_db")}
                         for mt, d in trained.per_type.items()}}
    return {name: MethodOutput(table, thr, info) for name, (table, thr) in scored.items()}


def _knn(ctx: EvalContext, tag: str, embed_cfg: EmbedConfig) -> MethodOutput:
    import ray

    from asd.embed import embed
    from asd.embeddings import embedding_blocks, read_embeddings
    from asd.layout import embeddings_dir
    from asd.score import build_banks, score_dataset

    res = embed(ctx.root, tag, embed_cfg)
    table = read_embeddings(embeddings_dir(ctx.root, tag))
    ids = table.column("clip_id")
    train = table.filter(pc.is_in(ids, pa.array(sorted(ctx.plan.train_ids), pa.string())))
    test = table.filter(pc.is_in(ids, pa.array(sorted(ctx.plan.test_ids), pa.string())))
    banks, thresholds = build_banks(train, ctx.cfg.score, embedding_blocks(res.embeddings))
    bs = max(1, ctx.cfg.score.batch_size)
    ds = ray.data.from_arrow([test.slice(i, bs) for i in range(0, test.num_rows, bs)] or [test])
    scores = score_dataset(ds, banks, thresholds, ctx.cfg.score)
    return MethodOutput(scores, thresholds, {"embeddings": res.embeddings, "dim": res.dim, "k": ctx.cfg.score.k,
                                             "bank_clips": train.num_rows})


def _checkpoint_problem(method: str, key: str, uri: str | None, required: bool) -> str | None:
    if uri is None:
        if required:
            return (f"{method} needs {key}.checkpoint=<an encoder.pt, e.g. the fine-tuning stage's "
                    f"<root>/models/<tag>/encoder.pt>; leave {method} out of `methods` to run without it")
        return None
    try:
        if storage.exists(uri):
            return None
    except Exception as exc:  # unreachable storage
        return f"{method}: {key}.checkpoint {uri!r} is unreachable ({type(exc).__name__}: {exc})"
    return f"{method}: {key}.checkpoint {uri!r} does not exist"


def _pretrained_encoder(ctx: EvalContext) -> str:
    """The pre-trained encoder: the configured checkpoint, or one pre-trained now on the split's
    training clips (a feature view of them, so a derived training split is used too)."""
    from dataclasses import replace

    from asd.pretrain import pretrain

    mc = ctx.cfg.pretrained
    if mc.checkpoint:
        return mc.checkpoint
    if "pretrain" in ctx.cache:  # pretrained_knn and finetuned_knn share one pre-training
        return ctx.cache["pretrain"]["encoder"]
    view = _train_view(ctx)
    # pretrain() names the run after the tag and checkpoints under <ctx.root>/checkpoints
    res = pretrain(view, ctx.root, replace(mc.pretrain, set_current=False), mc.pretrain_train)
    ctx.cache["pretrain"] = {"encoder": res.encoder, "steps": res.steps, "final_loss": res.final_loss}
    return res.encoder


def _train_view(ctx: EvalContext) -> str:
    """The split's training clips as a feature root of their own (what Ray Train reads)."""
    from asd.features import write_feature_view

    def make() -> str:
        view = storage.join(ctx.root, "evaluate", "train_view")
        write_feature_view(ctx.root, view, sorted(ctx.plan.train_ids), split="train", note="evaluation training split")
        return view

    return ctx.once("train_view", make)


def _finetuned_encoder(ctx: EvalContext) -> str:
    """The fine-tuned encoder: the configured checkpoint, or pseudo labels + fine-tuning now."""
    from dataclasses import replace

    import asd.models.embedders  # noqa: F401  (registers "encoder")
    from asd.cluster import pseudo_label
    from asd.embed import embed
    from asd.finetune import finetune

    mc = ctx.cfg.finetuned
    if mc.checkpoint:
        return mc.checkpoint
    start = _pretrained_encoder(ctx)
    view = _train_view(ctx)
    pre = ctx.cfg.pretrained
    emb = embed(view, pre.tag + "-train", replace(pre.embed, embedder="encoder",
                                                  params={**(pre.embed.params or {}), "checkpoint": start}))
    labels = storage.join(ctx.root, "labels", mc.finetune.tag)
    manifest = storage.join(ctx.root, "manifest", "manifest.parquet")
    pl = pseudo_label(emb.embeddings, labels, mc.cluster, manifest_uri=manifest if storage.exists(manifest) else None)
    res = finetune(view, ctx.root, replace(mc.finetune, init_checkpoint=start, labels=labels, set_current=False),
                   mc.finetune_train)
    ctx.cache["finetune"] = {"encoder": res.encoder, "from": start, "labels": labels, "steps": res.steps,
                             "num_classes": res.num_classes, "final_accuracy": res.final_accuracy,
                             "pseudo_label_quality": pl.quality}
    return res.encoder


def _encoder_knn(ctx: EvalContext, mc: EncoderMethodConfig, checkpoint: str) -> MethodOutput:
    from dataclasses import replace

    import asd.models.embedders  # noqa: F401  (registers "encoder")

    params = {**(mc.embed.params or {}), "checkpoint": checkpoint}
    out = _knn(ctx, mc.tag, replace(mc.embed, embedder="encoder", params=params))
    out.info["checkpoint"] = checkpoint
    for stage in ("pretrain", "finetune"):
        if stage in ctx.cache and ctx.cache[stage]["encoder"] == checkpoint:
            out.info[stage] = ctx.cache[stage]
    return out


def _direct_labels(ctx: EvalContext, uri: str, mode: str) -> str:
    """Labels of the split's training clips without clustering: ``section`` (no attribute) or
    ``real`` (the real attributes where the features have them)."""
    from asd.cluster import attribute_string

    keys = read_features_table(ctx.root, columns=["clip_id", "machine_type", "section", "domain", "attributes"])
    train = keys.filter(pc.is_in(keys.column("clip_id"), pa.array(sorted(ctx.plan.train_ids), pa.string())))
    rows = []
    for r in train.to_pylist():
        real = attribute_string(r["attributes"])
        rows.append({"clip_id": r["clip_id"], "machine_type": r["machine_type"], "section": r["section"],
                     "domain": r["domain"], "label": real if mode == "real" else None, "pseudo_label": None,
                     "real_label": real})
    stage = storage.staging_dir(uri)
    storage.write_table(storage.join(stage, "labels.parquet"), pa.Table.from_pylist(rows))
    commitlog.publish_dir(stage, uri, {"rows": len(rows), "label_source": mode})
    return uri


def _labels(ctx: EvalContext, mode: str) -> dict:
    """The training split's labels of ``mode`` (see :class:`CNNMethodConfig`), made once per run and
    shared by every encoder trained on them: ``{"labels": uri, "label_mode", ...}``."""
    return ctx.once(f"labels-{mode}", lambda: _make_labels(ctx, mode))


def _make_labels(ctx: EvalContext, mode: str) -> dict:
    from dataclasses import replace

    import asd.models.embedders  # noqa: F401  (registers "encoder")
    from asd.cluster import pseudo_label
    from asd.embed import embed

    mc = ctx.cfg.cnn
    view = _train_view(ctx)
    labels = storage.join(ctx.root, "labels", f"{mc.tag}-{mode}")
    info: dict = {"labels": labels, "label_mode": mode}
    if mode in ("section", "real"):
        _direct_labels(ctx, labels, mode)
    else:
        if mc.cluster_embed == "logmel":
            emb_cfg, emb_tag = ctx.cfg.logmel.embed, ctx.cfg.logmel.tag + "-train"
        else:
            pre = ctx.cfg.pretrained
            emb_cfg = replace(pre.embed, embedder="encoder",
                              params={**(pre.embed.params or {}), "checkpoint": _pretrained_encoder(ctx)})
            emb_tag = pre.tag + "-train"
        emb = ctx.once(f"train-embeddings-{emb_tag}", lambda: embed(view, emb_tag, emb_cfg))
        manifest = storage.join(ctx.root, "manifest", "manifest.parquet")
        pl = pseudo_label(emb.embeddings, labels, replace(mc.cluster, label_source="pseudo" if mode == "pseudo"
                                                          else "real_else_pseudo"),
                          manifest_uri=manifest if storage.exists(manifest) else None)
        info.update(clustered=mc.cluster_embed, pseudo_label_quality=pl.quality)
    return info


def _train_on_labels(ctx: EvalContext, key: str, tag: str, fcfg: FinetuneConfig, tcfg: TrainConfig,
                     mode: str) -> list[str]:
    """Encoders trained from scratch now (``fcfg.model``) on the labels of ``mode``: one, or the
    ``fcfg.members`` of an ensemble trained in one run (tags ``tag``, ``tag-m1``, ...); their training
    facts go to ``ctx.cache[key]``. Once per run and key."""
    from dataclasses import replace

    from asd.finetune import finetune

    def train() -> dict:
        info = dict(_labels(ctx, mode))
        res = finetune(_train_view(ctx), ctx.root,
                       replace(fcfg, tag=tag, embed_tag=tag, labels=info["labels"], set_current=False),
                       replace(tcfg, name=tag))
        info.update(encoder=res.encoder, encoders=res.encoders, steps=res.steps, num_classes=res.num_classes,
                    final_accuracy=res.final_accuracy, seconds=res.seconds)
        return info

    return ctx.once(key, train)["encoders"]


def _cnn_encoders(ctx: EvalContext, mode: str) -> list[str]:
    """The CNNs (``cnn.finetune.members``) trained now on the split's training clips with the labels
    of ``mode`` (see :class:`CNNMethodConfig`), or the configured checkpoint."""
    mc = ctx.cfg.cnn
    if mc.checkpoint:
        return [mc.checkpoint]
    return _train_on_labels(ctx, f"cnn-{mode}", f"{mc.tag}-{mode}", mc.finetune, mc.finetune_train, mode)


def _mod_encoders(ctx: EvalContext) -> list[str]:
    """The modulation CNNs (``mod.finetune.members``) trained now on the pseudo labels (:class:`ModMethodConfig`)."""
    mc = ctx.cfg.mod
    return _train_on_labels(ctx, "mod-pseudo", f"{mc.tag}-pseudo", mc.finetune, mc.finetune_train, "pseudo")


def _mod_knn(ctx: EvalContext) -> MethodOutput:
    from dataclasses import replace

    mc = ctx.cfg.mod
    out = _encoder_knn(ctx, replace(ctx.cfg.cnn, tag=f"{mc.tag}-pseudo", embed=mc.embed), _mod_encoders(ctx)[0])
    out.info["training"] = ctx.cache.get("mod-pseudo")
    return out


def _fused_knn(ctx: EvalContext) -> MethodOutput:
    """The log-mel CNNs and the modulation CNNs (all on the pseudo labels) fused by the ``concat``
    embedder (:class:`ModMethodConfig`), as the pipeline serves them."""
    from dataclasses import replace

    import asd.models.embedders  # noqa: F401  (registers "concat")

    ckpts = {"cnn": _cnn_encoders(ctx, "pseudo"), "mod": _mod_encoders(ctx)}
    embed_params = {"cnn": ctx.cfg.cnn.embed.params or {}, "mod": ctx.cfg.mod.embed.params or {}}
    members = [{"embedder": "encoder", "params": {**embed_params[arch], "checkpoint": c}, "weight": 1.0 / len(cs)}
               for arch, cs in ckpts.items() for c in cs]
    out = _knn(ctx, ctx.cfg.mod.fused_tag, replace(ctx.cfg.mod.embed, embedder="concat",
                                                   params={"members": members, "fusion": ctx.cfg.mod.fusion}))
    training = {arch: ctx.cache.get(f"{arch}-pseudo") for arch in ckpts}
    out.info.update(members=[m["params"]["checkpoint"] for m in members], fusion=ctx.cfg.mod.fusion,
                    training=training)
    return out


def _cnn_knn(ctx: EvalContext, mode: str) -> MethodOutput:
    from dataclasses import replace

    mc = ctx.cfg.cnn
    checkpoint = _cnn_encoders(ctx, mode)[0]
    out = _encoder_knn(ctx, replace(mc, tag=f"{mc.tag}-{mode}"), checkpoint)
    out.info["training"] = ctx.cache.get(f"cnn-{mode}")
    return out


register_method(Method(
    "ae_mse", "DCASE autoencoder baseline, MSE score", (AE,),
    lambda ctx: ctx.once("ae", lambda: _ae_scores(ctx))["ae_mse"]))
register_method(Method(
    "ae_mahalanobis", "DCASE autoencoder baseline, selective Mahalanobis score", (AE,),
    lambda ctx: ctx.once("ae", lambda: _ae_scores(ctx))["ae_mahalanobis"]))
register_method(Method(
    "logmel_knn", "cosine kNN on log-mel statistics", (LOGMEL,),
    lambda ctx: _knn(ctx, ctx.cfg.logmel.tag, ctx.cfg.logmel.embed)))
register_method(Method(
    "pretrained_knn", "cosine kNN on the self-supervised encoder", (LOGMEL,),
    lambda ctx: _encoder_knn(ctx, ctx.cfg.pretrained, _pretrained_encoder(ctx)),
    check=lambda ctx: _checkpoint_problem("pretrained_knn", "pretrained", ctx.cfg.pretrained.checkpoint, False)))
register_method(Method(
    "finetuned_knn", "cosine kNN on the fine-tuned encoder", (LOGMEL,),
    lambda ctx: _encoder_knn(ctx, ctx.cfg.finetuned, _finetuned_encoder(ctx)),
    check=lambda ctx: (_checkpoint_problem("finetuned_knn", "finetuned", ctx.cfg.finetuned.checkpoint, False)
                       or (None if ctx.cfg.finetuned.checkpoint
                           else _checkpoint_problem("finetuned_knn", "pretrained", ctx.cfg.pretrained.checkpoint,
                                                    False)))))
_CNN_TITLES = {"section": "type and section labels only", "pseudo": "Ward pseudo labels",
               "real": "the real attribute labels", "real_else_pseudo": "real attributes, else Ward pseudo labels"}
for _mode in CNN_LABELS:
    register_method(Method(
        f"cnn_{_mode}", f"cosine kNN on a CNN trained from scratch on {_CNN_TITLES[_mode]}", (LOGMEL,),
        (lambda mode: lambda ctx: _cnn_knn(ctx, mode))(_mode),
        check=lambda ctx: _checkpoint_problem("cnn", "cnn", ctx.cfg.cnn.checkpoint, False)))
register_method(Method(
    "mod_pseudo", "cosine kNN on a modulation-spectrum CNN trained from scratch on Ward pseudo labels", (LOGMEL,),
    _mod_knn))
register_method(Method(
    "fused_pseudo", "the log-mel CNN(s) and the modulation CNN ensemble, each member's cosine kNN distance summed (Ward pseudo labels)",
    (LOGMEL,), _fused_knn,
    check=lambda ctx: _checkpoint_problem("cnn", "cnn", ctx.cfg.cnn.checkpoint, False)))


# ----------------------------------------------------------------------------- the run


class MethodUnavailable(ValueError):
    """A requested method's prerequisites are missing (raised before any work)."""


@dataclass
class EvaluateResult:
    report_md: str
    report_json: str
    report_png: str
    official_scores: dict  # method -> official score (None when not computable)
    scores: dict  # method -> <root>/scores/<method>
    copies: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    input_uri: str,
    root: str,
    cfg: EvaluateConfig | None = None,
    *,
    name: str | None = None,
    config_snapshot: dict | None = None,
    report_to: str | None = None,
) -> EvaluateResult:
    """Run ``cfg.methods`` on the corpus ``input_uri`` with one split; write every method's scores
    and the comparison report under ``root`` (and copies as ``<report_to>.{md,json,png}``)."""
    from asd.baselines.autoencoder import featurize_frontend
    from asd.featurize import featurize
    from asd.score import write_results

    cfg = cfg or EvaluateConfig()
    t0 = time.perf_counter()
    if not cfg.methods:
        raise ValueError("no methods to evaluate")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ValueError(f"methods listed twice: {list(cfg.methods)}")
    methods = [get_method(m) for m in cfg.methods]
    ctx = EvalContext(input=input_uri, root=root, cfg=cfg)
    problems = [p for m in methods if (p := m.check(ctx))]
    if problems:
        raise MethodUnavailable("; ".join(problems))
    storage.check_reachable(input_uri)
    needs = {f for m in methods for f in m.features}
    featurized = {}
    if LOGMEL in needs:
        featurized[LOGMEL] = featurize(input_uri, root, cfg.featurize).to_dict()
    if AE in needs:
        featurized[AE] = featurize_frontend(input_uri, root, cfg.ae, cfg.featurize).to_dict()
    keys = _clip_keys(root, needs)
    ctx.plan = plan = plan_split(keys, cfg.derive_fraction)
    test_ids, train_ids = plan.test_ids, plan.train_ids
    if not test_ids:
        raise ValueError(f"no test clips in {input_uri!r}: nothing to score")
    results: dict[str, metrics.MetricsResult] = {}
    per_method: dict[str, dict] = {}
    not_run: dict[str, str] = {}  # method -> why it could not run on this corpus
    for m in methods:
        tm = time.perf_counter()
        log.info("=== method %s ===", m.name)
        try:
            out = m.run(ctx)
        except SingleClassError as exc:  # e.g. section labels of a corpus with one type and one section
            log.warning("method %s not run: %s", m.name, exc)
            not_run[m.name] = f"not run: {exc}"
            continue
        scored = set(out.scores.column("clip_id").to_pylist())
        if scored & train_ids:
            raise AssertionError(f"{m.name} scored training clips {sorted(scored & train_ids)[:3]}")
        if scored != test_ids:
            raise AssertionError(f"{m.name} scored {len(scored)} clips, the test set has {len(test_ids)} "
                                 f"(missing e.g. {sorted(test_ids - scored)[:3]})")
        if out.scores.schema != SCORE_SCHEMA:
            raise AssertionError(f"{m.name} returned scores in another schema: {out.scores.schema}")
        res = write_results(out.scores, out.thresholds, layout.scores_dir(root, m.name), ScoreConfig(plots=cfg.plots),
                            title=f"{m.name}: {m.title}")
        results[m.name] = metrics.evaluate_table(out.scores)
        per_method[m.name] = {"title": m.title, "scores": res.scores, "n_scored": res.n_scored,
                              "official_score": res.official_score, "metrics": res.metrics,
                              "seconds": round(time.perf_counter() - tm, 1), "info": out.info}
    if not results:
        raise MethodUnavailable("no method could run on this corpus: " + "; ".join(f"{m}: {why}" for m, why in not_run.items()))
    return _write_report(input_uri, root, cfg, name, config_snapshot, report_to, keys, plan, featurized, results,
                         per_method, t0, not_run)


def _clip_keys(root: str, needs: set[str]) -> pa.Table:
    """The featurized clips of this corpus. A root is one corpus: featurize is incremental, so a
    root that also holds another corpus's clips (a second input into the same root) is refused."""
    tables = {}
    if LOGMEL in needs:
        tables[LOGMEL] = read_features_table(root, columns=KEY_COLUMNS)
    if AE in needs:
        tables[AE] = read_features_table(layout.ae_root(root), columns=KEY_COLUMNS)
    for kind, t in tables.items():
        base = root if kind == LOGMEL else layout.ae_root(root)
        listed = set(storage.read_table(storage.join(base, "manifest", "manifest.parquet"),
                                        columns=["clip_id"]).column("clip_id").to_pylist())
        extra = sorted(set(t.column("clip_id").to_pylist()) - listed)
        if extra:
            raise ValueError(f"{layout.features_dir(base)!r} holds {len(extra)} clip(s) that are not in this input "
                             f"(e.g. {extra[:3]}): the root was used for another corpus; evaluate into a fresh "
                             "root (e.g. run=evaluate-<data name>)")
    sets = {k: set(t.column("clip_id").to_pylist()) for k, t in tables.items()}
    if len(sets) == 2 and sets[LOGMEL] != sets[AE]:
        only = sorted(sets[LOGMEL] ^ sets[AE])
        raise ValueError(f"the two front ends featurized different clips ({len(only)} differ, e.g. {only[:3]}); "
                         f"see the quarantine folders under {layout.features_dir(root)!r} and "
                         f"{layout.features_dir(layout.ae_root(root))!r}")
    keys = next(iter(tables.values()))
    if keys.num_rows == 0:
        raise ValueError(f"no featurized clips under {root!r}: nothing to evaluate")
    return keys


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f} %"


def _write_report(input_uri, root, cfg, name, config_snapshot, report_to, keys, plan, featurized, results,
                  per_method, t0, not_run: dict[str, str]) -> EvaluateResult:
    out_dir = storage.join(root, "evaluate")
    title = f"Accuracy against the DCASE autoencoder baseline: {name or input_uri}"
    counts = plan.counts()
    data = {"input": input_uri, "clips": keys.num_rows, "sha256": data_sha256(keys),
            "quarantined": {k: v.get("n_quarantined") for k, v in featurized.items()}}
    split = {"sha256": plan.sha256(), "derive_fraction": plan.derive_fraction, "derived": plan.derived,
             "excluded": plan.excluded(), "counts": counts,
             "rule": ("train folders' clips (not labelled anomalous) train and form banks; test folders' clips "
                      "are scored; a section without training clips gets floor(n * derive_fraction) of each "
                      "domain's normal test clips (ordered by sha256 of the clip id) as its training split; a "
                      "test clip with the same audio bytes as a training clip is excluded")}
    official = {m: r.official_score for m, r in results.items()}
    official = {m: (None if v is None or math.isnan(v) else float(v)) for m, v in official.items()}
    table_md = report.methods_markdown(results)
    lines = [f"# {title}", ""]
    lines += [(f"Data: `{input_uri}`, {keys.num_rows} clips, sha256 of (clip id, content sha256) "
               f"`{data['sha256']}`."), ""]
    lines += ["Split (the same for every method; split sha256 `" + split["sha256"] + "`):", ""]
    lines += ["| machine type | train / bank clips | test clips (normal / anomaly) | excluded |", "|---|---:|---:|---:|"]
    for mt, c in counts.items():
        lines.append(f"| {mt} | {c[TRAIN]} | {c[TEST]} ({c['test_normal']} / {c['test_anomaly']}) | {c[EXCLUDED]} |")
    lines.append("")
    if plan.derived:
        for d in plan.derived:
            lines.append(f"- {d['machine_type']} section {d['section']} has no train split: training split formed "
                         f"from normal test clips {d['train_clips']} (ordered by sha256 of the clip id; never scored).")
    else:
        lines.append("- Every section has its own train split; no training clip is scored.")
    for e in plan.excluded():
        lines.append(f"- excluded `{e['clip_id']}`: {e['reason']}")
    lines += ["", "## Official score (harmonic mean of AUC-source, AUC-target, pAUC)", "",
              "| method | official score | what |", "|---|---:|---|"]
    for m, d in per_method.items():
        served = " (the pipeline's served recipe)" if m == cfg.served_method else ""
        lines.append(f"| {m} | **{_pct(official[m])}** | {d['title']}{served} |")
    for m, why in not_run.items():
        lines.append(f"| {m} | – | {get_method(m).title}: {why} |")
    lines += ["", "## Score per machine type (harmonic mean of its AUC-s, AUC-t, pAUC; percent)", "",
              _type_scores_markdown(results),
              "## Per machine type and metric (percent; AUC-s, AUC-t, pAUC are harmonic means over sections)", "",
              table_md]
    lines += _pseudo_label_markdown(per_method)
    notes = _notes(per_method)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += [("Bar chart: `report.png` beside this file. Per-method scores, DCASE CSVs, ROC curves and "
               f"histograms: `{storage.join(root, 'scores', '<method>')}/`."), ""]
    payload = {
        "title": title, "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "root": root, "data": data, "split": split, "official_scores": official,
        "served_method": cfg.served_method, "not_run": not_run,
        "methods": per_method, "table_markdown": table_md, "notes": notes,
        "featurize": featurized, "seconds": round(time.perf_counter() - t0, 1),
        "config": {"evaluate": json_safe(asdict(cfg)), "job": config_snapshot},
    }
    md_uri = storage.atomic_write_text(storage.join(out_dir, "report.md"), "\n".join(lines) + "\n")
    json_uri = storage.atomic_write_json(storage.join(out_dir, "report.json"), json_safe(payload))
    png_uri = report.plot_method_bars(storage.join(out_dir, "report.png"), results)
    copies = []
    if report_to:
        for ext, src in (("md", md_uri), ("json", json_uri), ("png", png_uri)):
            copies.append(storage.atomic_write_bytes(f"{report_to}.{ext}", storage.read_bytes(src)))
    print("\n" + "\n".join(lines), flush=True)
    log.info("evaluation report: %s", md_uri)
    return EvaluateResult(report_md=md_uri, report_json=json_uri, report_png=png_uri, official_scores=official,
                          scores={m: d["scores"] for m, d in per_method.items()}, copies=copies,
                          seconds=time.perf_counter() - t0)


def _type_scores_markdown(results: dict[str, metrics.MetricsResult]) -> str:
    """Rows: machine types and the official score; columns: methods (percent)."""
    methods = list(results)
    types = sorted({t for r in results.values() for t in r.machine_types})
    lines = ["| machine type | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for t in types:
        cells = [report._pct(results[m].per_type.get(t, float("nan"))) for m in methods]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| **official score** | " + " | ".join(f"**{report._pct(results[m].official_score)}**"
                                                    for m in methods) + " |")
    return "\n".join(lines) + "\n"


_CLUSTERED = {"logmel": "log-mel statistics of the training clips",
              "pretrained": "the pre-trained encoder's embeddings of the training clips"}


def _training_records(info: dict) -> dict[str, dict]:
    """A method's training records by architecture: ``info["training"]`` is one record (it has
    ``steps``) or, for the fused method, one per architecture (``{"cnn": ..., "mod": ...}``)."""
    tr = info.get("training") or {}
    if "steps" in tr:
        return {"": tr}
    return {k: v for k, v in tr.items() if isinstance(v, dict)}


def pseudo_label_sets(per_method: dict) -> list[dict]:
    """The pseudo labellings the methods trained on, each once: ``{"labels", "clustered",
    "quality", "methods"}`` (``quality``: per machine type ARI/NMI against the real attributes,
    :func:`asd.cluster.pseudo_label`). The CNNs' labels cluster ``cnn.cluster_embed``; the
    fine-tuned encoder's cluster the pre-trained encoder's embeddings, as the pipeline does."""
    sets: dict[str, dict] = {}

    def add(method: str, info: dict | None, clustered: str | None) -> None:
        if not info or not info.get("pseudo_label_quality"):
            return
        entry = sets.setdefault(info["labels"], {"labels": info["labels"], "clustered": clustered,
                                                 "quality": info["pseudo_label_quality"], "methods": []})
        if method not in entry["methods"]:
            entry["methods"].append(method)

    for m, d in per_method.items():
        info = d.get("info") or {}
        add(m, info.get("finetune"), "pretrained")
        for record in _training_records(info).values():
            add(m, record, record.get("clustered"))
    return list(sets.values())


def _pseudo_label_markdown(per_method: dict) -> list[str]:
    """Per labelling, per machine type: how the Ward pseudo labels agree with the real attributes."""
    sets = pseudo_label_sets(per_method)
    if not sets:
        return []
    lines = ["## Pseudo labels against the real attributes (training split)", ""]
    for s in sets:
        what = _CLUSTERED.get(s["clustered"], str(s["clustered"]))
        lines += [f"Ward clusters of {what} (`{s['labels']}`), used by {', '.join(s['methods'])}:", "",
                  "| machine type | clips | pseudo classes | real classes | ARI | NMI |", "|---|---:|---:|---:|---:|---:|"]
        for mt, q in sorted(s["quality"].items()):
            ari, nmi = q.get("ari"), q.get("nmi")
            lines.append(f"| {mt} | {q.get('n_clips')} | {q.get('n_pseudo_classes')} | {q.get('n_real_classes')} | "
                         + (f"{ari:.3f}" if ari is not None else "n/a") + " | "
                         + (f"{nmi:.3f}" if nmi is not None else "n/a") + " |")
        lines.append("")
    lines += ["Machine types without real attribute labels (`noAttribute`) have no row: there is nothing to "
              "compare their clusters with.", ""]
    return lines


def _notes(per_method: dict) -> list[str]:
    notes = []
    for m in ("ae_mse", "ae_mahalanobis"):
        if m in per_method:
            info = per_method[m]["info"]
            tr = info.get("training", {})
            n_types = max(1, len(info.get("per_type", {})))
            notes.append(f"Autoencoder baseline: one model per machine type, trained together in one Ray Train run "
                         f"of {tr.get('steps')} steps, each of {tr.get('batch_clips')} clips "
                         f"({(tr.get('batch_clips') or 0) // n_types} per machine type) x 16-frame crops, 12 "
                         "context vectors each (the official recipe: 100 epochs over every context vector); front "
                         "end = Kaldi fbank at 64 ms / 32 ms, 128 bins, in dB; Mahalanobis reduction "
                         f"`{info.get('maha_reduction')}` (see asd/baselines/autoencoder.py for every difference "
                         "from the official code).")
            fallback = [mt for mt, d in info.get("per_type", {}).items() if d.get("target_covariance", "").startswith("source")]
            if fallback and "ae_mahalanobis" in per_method:
                notes.append(f"No target-domain training clips for {', '.join(fallback)}: the Mahalanobis target "
                             "covariance is the source one (the official rule), so AE-Mahalanobis there is a "
                             "source-only score.")
            break
    def classes(tr: dict) -> str:
        acc = tr.get("final_accuracy")
        return f"{tr.get('num_classes')} classes" + (f", final training accuracy {100 * acc:.1f} %" if acc is not None
                                                     else "")

    def trained(tr: dict) -> str:
        n = len(tr.get("encoders") or [])
        return (f"trained from scratch in this run for {tr.get('steps')} steps on the training split's "
                f"{tr.get('label_mode')} labels ({classes(tr)}"
                + (f"; {n} models side by side in one run" if n > 1 else "") + ")")

    for m, d in per_method.items():
        if m in ("ae_mse", "ae_mahalanobis"):  # described above
            continue
        pre = d["info"].get("pretrain")
        ft = d["info"].get("finetune")
        records = _training_records(d["info"])
        if ft:
            notes.append(f"{m}: encoder fine-tuned in this run for {ft.get('steps')} steps from the encoder "
                         f"pre-trained in this run, on Ward pseudo labels of that encoder's embeddings of the "
                         f"training split ({classes(ft)}).")
        elif pre:
            notes.append(f"{m}: encoder pre-trained in this run for {pre['steps']} steps on the training split "
                         f"(final loss {pre['final_loss']:.4g}).")
        elif "" in records:
            notes.append(f"{m}: encoder {trained(records[''])}.")
        elif records:
            notes.append(f"{m}: " + "; ".join(f"{k} encoder {trained(v)}" for k, v in records.items()) + ".")
        elif d["info"].get("checkpoint"):
            notes.append(f"{m}: encoder `{d['info']['checkpoint']}`, trained outside this run (which clips it "
                         "saw in training is not checked here).")
    return notes


def json_safe(obj):
    """``obj`` with tuples as lists and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "EmbedMethodConfig",
    "EncoderMethodConfig",
    "EvalContext",
    "EvaluateConfig",
    "EvaluateResult",
    "Method",
    "MethodOutput",
    "MethodUnavailable",
    "SplitPlan",
    "data_sha256",
    "evaluate",
    "get_method",
    "json_safe",
    "plan_split",
    "register_method",
]
