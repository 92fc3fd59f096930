"""The stage dataclasses of ``asd`` as Hydra structured configs: the one source of every setting.

Each config group whose options configure one stage has a ``schema`` option built here from that
stage's dataclass (its fields, types and defaults), and every YAML option of the group starts from
it (``defaults: [schema, _self_]``) and states only what differs. So a key is typed and known
before anything runs (a typo fails at composition with Hydra's own message), every field can be
overridden from the command line without ``+``, and ``python -m jobs.<job> --cfg job`` prints the
whole resolved config, defaults included. ``tests/test_configs.py`` checks that no YAML restates a
default.

| group | node | from |
|---|---|---|
| ``recipe`` | one detector | ``asd.recipes.recipe.Recipe``, its pre-training, labels and models as the nodes below |
| ``pretrain`` | the pre-training stage | ``asd.stages.pretrain.PretrainConfig`` + ``train: asd.training.loop.TrainConfig`` |
| ``finetune`` | one fine-tuned or trained model | ``asd.stages.finetune.FinetuneConfig`` + ``train`` (+ a recipe's ``checkpoint``) |
| ``cluster`` | pseudo labelling | ``asd.stages.pseudo_label.PseudoLabelConfig`` |
| ``embed`` | the embedding actors of a job | ``asd.stages.embed.EmbedConfig`` but what is embedded |
| ``score`` | kNN scoring | ``asd.stages.score.ScoreConfig`` |
| ``featurize`` | the front ends | ``asd.stages.featurize.FeaturizeConfig`` |
| ``device`` | where stages run | ``asd.resources.DeviceConfig`` |
| ``ae`` | the DCASE autoencoder baseline | ``asd.baselines.autoencoder.AEConfig`` (its published settings) |

Each job module registers the groups its config uses when it is imported (before Hydra composes);
``jobs.common.compose_config`` registers them all. A schema is built, and its stage module
imported, only when registered.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

SCHEMA = "schema"  # the option name of each group's schema


def _field_like(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory)
    return dataclasses.field(default=f.default)


# fault injection for tests (asd.training.faults, asd.stages.featurize): settable on the dataclasses, never in a shipped
# config; a test that drives a job with them adds them with '+' (the dataclass still checks them)
TEST_ONLY = frozenset({"fail_at_step", "fail_rank", "fail_mode", "fail_wait_s", "kill_worker_once_marker",
                       "kill_worker_on_clip"})


def with_fields(cls: type, name: str, extra: list[tuple[str, Any, dataclasses.Field]] = (),
                exclude: tuple[str, ...] = ()) -> type:
    """A dataclass named ``name`` with the fields of ``cls`` but the test-only ones and ``exclude``
    (resolved types, same defaults), and ``extra``."""
    hints = typing.get_type_hints(cls)
    spec = [(f.name, hints[f.name], _field_like(f)) for f in dataclasses.fields(cls)
            if f.name not in TEST_ONLY and f.name not in exclude]
    return dataclasses.make_dataclass(name, [*spec, *extra])


def _train(factory) -> tuple[str, Any, dataclasses.Field]:
    """A stage's ``train:`` node (``factory``'s values); its Ray Train run (and checkpoint folder) is
    named after the stage's tag."""
    from asd.training.loop import TrainConfig

    node_cls = node("train")

    def make():
        values = {k: v for k, v in dataclasses.asdict((factory or TrainConfig)()).items() if k not in TEST_ONLY}
        return node_cls(**{**values, "name": "${..tag}"})
    return ("train", node_cls, dataclasses.field(default_factory=make))


def _pretrain():
    from asd.stages.pretrain import PretrainConfig
    return with_fields(PretrainConfig, "PretrainNode", [_train(None)])


def _finetune():
    from asd.stages.finetune import FinetuneConfig
    return with_fields(FinetuneConfig, "FinetuneNode", [
        _train(None),
        ("checkpoint", Optional[str], dataclasses.field(default=None)),  # a recipe's model: an existing encoder.pt
    ])


def _ae():
    from asd.baselines.autoencoder import AEConfig
    return AEConfig


def _embed():
    from asd.stages.embed import EmbedConfig
    return with_fields(EmbedConfig, "EmbedNode", exclude=("embedder", "params"))


def _score():
    from asd.stages.score import ScoreConfig
    return ScoreConfig


def _cluster():
    from asd.stages.pseudo_label import PseudoLabelConfig
    return PseudoLabelConfig


def _featurize():
    from asd.stages.featurize import FeaturizeConfig
    return with_fields(FeaturizeConfig, "FeaturizeNode")


def _device():
    from asd.resources import DeviceConfig
    return DeviceConfig


def _recipe():
    from asd.recipes.recipe import EmbedEntry, Labels, Recipe

    labels = with_fields(Labels, "LabelsNode", exclude=("cluster",),
                         extra=[("cluster", node("cluster"), dataclasses.field(default_factory=node("cluster")))])
    return with_fields(Recipe, "RecipeNode", exclude=("name", "pretrain", "labels", "models", "embed"), extra=[
        ("name", str, dataclasses.field(default="???")),  # each recipe names itself (its file's name)
        ("pretrain", Optional[node("pretrain")], dataclasses.field(default=None)),
        ("labels", Optional[labels], dataclasses.field(default=None)),
        ("models", dict[str, node("finetune")], dataclasses.field(default_factory=dict)),
        ("embed", list[EmbedEntry], dataclasses.field(default_factory=lambda: [EmbedEntry()])),
    ])


def _train_node():
    from asd.training.loop import TrainConfig
    return with_fields(TrainConfig, "TrainNode")


# group -> how to build its schema; built (and the stage module imported) only when a job needs it,
# so a featurize or rescoring job's driver does not import torch for the training stages' configs
_BUILDERS: dict[str, Callable[[], type]] = {
    "recipe": _recipe,
    "pretrain": _pretrain,
    "finetune": _finetune,
    "cluster": _cluster,
    "embed": _embed,
    "score": _score,
    "featurize": _featurize,
    "device": _device,
    "ae": _ae,
}
GROUPS = tuple(_BUILDERS)
_BUILT: dict[str, type] = {}


def node(group: str) -> type:
    """The schema dataclass of ``group`` (``"train"``: a training stage's ``train:`` node)."""
    if group not in _BUILT:
        _BUILT[group] = _train_node() if group == "train" else _BUILDERS[group]()
    return _BUILT[group]


def register(*groups: str) -> None:
    """Store the schemas of ``groups`` (default: every group) in Hydra's ConfigStore; each job
    module registers the groups its config uses before Hydra composes it (idempotent)."""
    cs = ConfigStore.instance()
    for group in groups or GROUPS:
        cs.store(group=group, name=SCHEMA, node=node(group))
