"""Running recipes (:mod:`asd.recipes.recipe`) through the stages, on one storage root and one split.

A :class:`RecipeRun` is the one place where a detector is wired: the pipeline runs the served
recipe (and the recipes it compares it with), an evaluation runs several recipes on its split,
and the stage jobs run one step of a recipe. For a recipe it makes, in order,

1. ``pretrain``: the pre-trained encoder (:func:`asd.stages.pretrain.pretrain`), or takes ``encoder``;
2. ``pseudo_label``: the labels (:func:`asd.stages.pseudo_label.pseudo_label` of the clustered
   embedding, or :func:`~asd.stages.pseudo_label.attribute_labels`);
3. ``finetune``: every model (:func:`asd.stages.finetune.finetune`);
4. ``embed``: the recipe's embedding (:func:`asd.stages.embed.embed`);
5. ``score``: kNN scores and the report (:func:`asd.stages.score.score`).

What several recipes define the same (a pre-trained encoder, labels, a model, an embedding, by
its folder name) is made once per run; the same name with other settings is an error that says
which recipes disagree. A step left out of ``stages`` is not run: its output must already be
published under the root (a rerun of later stages).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from asd.io import layout, storage
from asd.models.embedders import FEATURE_EMBEDDERS
from asd.recipes import recipe as R
from asd.resources import DeviceConfig
from asd.stages.embed import EmbedConfig
from asd.stages.score import ScoreConfig
from asd.training.loop import TrainConfig

log = logging.getLogger(__name__)

STEPS = ("pretrain", "pseudo_label", "finetune", "embed", "score")


def missing_files(recipes) -> list[str]:
    """What each recipe names outside its run (an existing pre-trained encoder, a model's own
    checkpoint or start) that does not exist or cannot be reached: one line each, to fail before any work."""
    problems = []
    for r in recipes:
        named = [("encoder", r.encoder)] + [(f"models.{n}.checkpoint", m.checkpoint) for n, m in r.models.items()]
        named += [(f"models.{n}.init_checkpoint", m.finetune.init_checkpoint) for n, m in r.models.items()]
        for key, uri in named:
            if not uri:
                continue
            try:
                if not storage.exists(uri):
                    problems.append(f"recipe {r.name}: {key} {uri!r} does not exist")
            except Exception as exc:  # unreachable storage
                problems.append(f"recipe {r.name}: {key} {uri!r} is unreachable ({type(exc).__name__}: {exc})")
    return problems


class RecipeConflict(ValueError):
    """Two recipes of one run define one artefact (same folder) with different settings."""


@dataclass
class Split:
    """Which clips train (and form the memory banks) and which are scored. ``train_root``: the
    features the training stages read (their ``split == "train"`` rows). ``train_ids`` and
    ``test_ids`` None: the normal clips of the train folders, and the clips of the test folders."""

    train_root: str
    train_ids: frozenset | None = None
    test_ids: frozenset | None = None


@dataclass
class RecipeResult:
    """What one recipe made: the paths, and how its training went (for reports)."""

    name: str
    pretrained: str | None = None
    pretrain: dict | None = None  # encoder, steps, final loss
    labels: dict | None = None  # uri, source, clustered, quality
    models: dict = field(default_factory=dict)  # name -> encoders, steps, classes, accuracy
    embeddings: str | None = None
    embedder: str | None = None
    params: dict | None = None
    score: Any = None  # asd.stages.score.ScoreResult

    def to_dict(self) -> dict:
        out = asdict(self)
        out["score"] = self.score.to_dict() if self.score is not None else None
        return out


class RecipeRun:
    """Recipes through the stages on ``root`` (see the module docstring).

    ``embed`` and ``score``: the job's embedding actors and kNN settings; ``device``: where
    training, model-backed embedding and scoring run; ``fresh``: train every model anew (an
    evaluation measures: it never continues an earlier run's checkpoints)."""

    def __init__(self, root: str, split: Split, embed: EmbedConfig | None = None, score: ScoreConfig | None = None,
                 device: DeviceConfig | None = None, stages=STEPS, fresh: bool = False):
        unknown = set(stages) - set(STEPS)
        if unknown:
            raise ValueError(f"unknown steps {sorted(unknown)}; the steps of a recipe: {list(STEPS)}")
        self.root, self.split, self.stages, self.fresh = root, split, tuple(stages), fresh
        self.embed_cfg = embed or EmbedConfig()
        self.score_cfg = (device or DeviceConfig()).for_scoring(score or ScoreConfig())
        self.device = device or DeviceConfig()
        self.results: dict[str, RecipeResult] = {}
        self._made: dict[tuple[str, str], tuple[Any, str, Any]] = {}  # (kind, folder) -> (settings, recipe, result)

    # ------------------------------------------------------------------ sharing

    def _once(self, kind: str, name: str, settings: Any, owner: str, make: Callable[[], Any]) -> Any:
        key = (kind, name)
        if key in self._made:
            seen, first, result = self._made[key]
            if seen != settings:
                raise RecipeConflict(
                    f"{kind} {name!r} is defined by recipes {first!r} and {owner!r} with different settings; "
                    f"give one of them its own tag (e.g. models.<name>.tag), or leave one recipe out")
            return result
        result = make()
        self._made[key] = (settings, owner, result)
        return result

    def _result(self, recipe: R.Recipe) -> RecipeResult:
        return self.results.setdefault(recipe.name, RecipeResult(name=recipe.name))

    def _train(self, tcfg: TrainConfig) -> TrainConfig:
        tcfg = self.device.for_training(tcfg)
        return replace(tcfg, resume=False) if self.fresh else tcfg

    # ------------------------------------------------------------------ steps

    def pretrained(self, recipe: R.Recipe) -> str | None:
        """The recipe's pre-trained encoder file (None when it has none)."""
        if recipe.encoder or recipe.pretrain is None:
            self._result(recipe).pretrained = recipe.encoder
            return recipe.encoder
        pcfg, tcfg = recipe.pretrain.pretrain, self._train(recipe.pretrain.train)
        out = layout.encoder_uri(self.root, pcfg.tag)

        def make() -> dict:
            if "pretrain" not in self.stages:
                return {"encoder": storage.require_exists(out, "run the pretrain stage first")}
            from asd.stages.pretrain import pretrain

            res = pretrain(self.split.train_root, self.root, pcfg, replace(tcfg, name=pcfg.tag))
            return {"encoder": res.encoder, "steps": res.steps, "start_step": res.start_step,
                    "final_loss": res.final_loss, "checkpoint": res.checkpoint}

        info = self._once("pre-trained encoder", pcfg.tag, (pcfg, tcfg), recipe.name, make)
        result = self._result(recipe)
        result.pretrained, result.pretrain = info["encoder"], info
        return info["encoder"]

    def labels(self, recipe: R.Recipe) -> str | None:
        """The recipe's labels folder (None when it trains nothing)."""
        if recipe.labels is None:
            return None
        lab = recipe.labels
        out = layout.labels_dir(self.root, lab.tag_name())

        def make() -> dict:
            info = {"labels": out, "source": lab.source, "clustered": lab.clustered if lab.clusters else None}
            if "pseudo_label" not in self.stages:
                storage.require_published(out)
                return info
            from asd.stages.pseudo_label import attribute_labels, pseudo_label

            if not lab.clusters:
                attribute_labels(self.split.train_root, out, lab.source, self.split.train_ids)
                rows = storage.read_table(storage.join(out, "labels.parquet"), columns=["clip_id"]).num_rows
                return {**info, "n_clips": rows}
            member = R.source_member(lab.clustered, self.pretrained(recipe))
            clustered = self._embed(recipe, [member], lab.clustered, "pseudo_label")
            res = pseudo_label(clustered, out, lab.cluster_config(), manifest_uri=self._manifest(),
                               clip_ids=self.split.train_ids)
            return {**info, "quality": res.quality, "n_clips": res.n_clips}

        settings = (lab.source, lab.clustered, lab.cluster_config() if lab.clusters else None,
                    self.pretrained(recipe) if lab.clusters and lab.clustered == R.PRETRAINED else None)
        info = self._once("labels", lab.tag_name(), settings, recipe.name, make)
        self._result(recipe).labels = info
        return info["labels"]

    def model(self, recipe: R.Recipe, name: str) -> list[str]:
        """The encoder files of model ``name`` of the recipe, one per ensemble member."""
        spec = recipe.models[name]
        if spec.checkpoint:  # an existing encoder: nothing to train
            self._result(recipe).models[name] = {"encoders": [spec.checkpoint]}
            return [spec.checkpoint]
        labels = self.labels(recipe)
        init = self.pretrained(recipe) if spec.from_pretrained else spec.finetune.init_checkpoint
        fcfg = replace(spec.finetune, labels=labels, init_checkpoint=init)
        tcfg = self._train(spec.train)
        files = [layout.encoder_uri(self.root, t) for t in spec.tags]

        def make() -> dict:
            if "finetune" not in self.stages:
                return {"encoders": [storage.require_exists(f, "run the finetune stage first") for f in files]}
            from asd.stages.finetune import finetune

            res = finetune(self.split.train_root, self.root, fcfg, replace(tcfg, name=fcfg.tag))
            return {"encoders": res.encoders, "steps": res.steps, "start_step": res.start_step,
                    "num_classes": res.num_classes, "final_accuracy": res.final_accuracy,
                    "seconds": round(res.seconds, 1), "labels": labels}

        info = self._once("model", fcfg.tag, (fcfg, tcfg), recipe.name, make)
        self._result(recipe).models[name] = info
        return info["encoders"]

    def embedding(self, recipe: R.Recipe) -> str:
        """The recipe's embedding of every featurized clip: ``embeddings/<recipe name>``."""
        encoders = {name: self.model(recipe, name) for name in recipe.models}
        members = R.members(recipe, encoders, self.pretrained(recipe))
        uri = self._embed(recipe, members, recipe.name, "embed")
        res = self._result(recipe)
        res.embeddings, (res.embedder, res.params) = uri, R.embedder(members, recipe.fusion)
        return uri

    def _embed(self, recipe: R.Recipe, members: list[dict], tag: str, step: str) -> str:
        """``embeddings/<tag>`` made with the embedder of ``members`` by ``step`` (once per run and tag)."""
        name, params = R.embedder(members, recipe.fusion)
        cfg = replace(self.embed_cfg, embedder=name, params=params)
        cfg = self.device.for_embedding(cfg, runs_a_model=name not in FEATURE_EMBEDDERS)
        out = layout.embeddings_dir(self.root, tag)

        def make() -> str:
            if step not in self.stages:
                return storage.require_published(out)
            from asd.stages.embed import embed

            return embed(self.root, tag, cfg).embeddings

        return self._once("embedding", tag, (name, params), recipe.name, make)

    def score(self, recipe: R.Recipe):
        """kNN scores, DCASE CSVs, metrics and report of the recipe: ``scores/<recipe name>``."""
        embeddings = self.embedding(recipe)
        out = layout.scores_dir(self.root, recipe.name)
        cfg = replace(self.score_cfg, **recipe.score)

        def make():
            if "score" not in self.stages:
                storage.require_published(out)
                return None
            from asd.stages.score import score

            return score(embeddings, out, cfg, title=f"{recipe.name}: {recipe.title or recipe.name}",
                         train_ids=self.split.train_ids, test_ids=self.split.test_ids)

        res = self._once("scores", recipe.name, (embeddings, cfg), recipe.name, make)
        self._result(recipe).score = res
        return res

    def run(self, recipe: R.Recipe, steps=STEPS) -> RecipeResult:
        """Every step of ``steps`` for one recipe (each step also makes what it needs)."""
        for step in steps:
            if step == "pretrain":
                self.pretrained(recipe)
            elif step == "pseudo_label":
                if any(not m.checkpoint for m in recipe.models.values()):  # something trains on them
                    self.labels(recipe)
            elif step == "finetune":
                for name in recipe.models:
                    self.model(recipe, name)
            elif step == "embed":
                self.embedding(recipe)
            elif step == "score":
                self.score(recipe)
        return self._result(recipe)

    # ------------------------------------------------------------------ helpers

    def _manifest(self) -> str | None:
        uri = layout.manifest_uri(self.root)
        return uri if storage.exists(uri) else None


__all__ = ["RecipeConflict", "RecipeResult", "RecipeRun", "STEPS", "Split", "missing_files"]
