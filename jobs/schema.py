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
| ``pretrain`` | the pre-training stage | ``asd.pretrain.PretrainConfig`` + ``train: asd.loop.TrainConfig`` |
| ``finetune`` | one fine-tuning run | ``asd.finetune.FinetuneConfig`` + ``train`` |
| ``embed`` | one embedding | ``asd.embed.EmbedConfig`` + ``tag`` and the pipeline's ``after`` |
| ``score`` | kNN scoring | ``asd.score.ScoreConfig`` |
| ``cluster`` | pseudo labelling | ``asd.ward.ClusterConfig`` |
| ``featurize`` | the front ends | ``asd.featurize.FeaturizeConfig`` |
| ``ae`` | the DCASE autoencoder baseline | ``asd.baselines.autoencoder.AEConfig`` + ``train`` (its published settings) |
| ``method_embed`` | an embedding inside an evaluation method | ``asd.embed.EmbedConfig`` |

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


# fault injection for tests (asd.faults, asd.featurize): settable on the dataclasses, never in a shipped
# config; a test that drives a job with them adds them with '+' (the dataclass still checks them)
TEST_ONLY = frozenset({"fail_at_step", "fail_rank", "fail_mode", "fail_wait_s", "kill_worker_once_marker",
                       "kill_worker_on_clip"})


def with_fields(cls: type, name: str, extra: list[tuple[str, Any, dataclasses.Field]] = ()) -> type:
    """A dataclass named ``name`` with the fields of ``cls`` but the test-only ones (resolved types,
    same defaults), and ``extra``."""
    hints = typing.get_type_hints(cls)
    spec = [(f.name, hints[f.name], _field_like(f)) for f in dataclasses.fields(cls) if f.name not in TEST_ONLY]
    return dataclasses.make_dataclass(name, [*spec, *extra])


def _train(factory) -> tuple[str, Any, dataclasses.Field]:
    """A stage's ``train:`` node (``factory``'s values); its Ray Train run (and checkpoint folder) is
    named after the stage's tag."""
    from asd.loop import TrainConfig

    node_cls = node("train")

    def make():
        values = {k: v for k, v in dataclasses.asdict((factory or TrainConfig)()).items() if k not in TEST_ONLY}
        return node_cls(**{**values, "name": "${..tag}"})
    return ("train", node_cls, dataclasses.field(default_factory=make))


def _pretrain():
    from asd.pretrain import PretrainConfig
    return with_fields(PretrainConfig, "PretrainNode", [_train(None)])


def _finetune():
    from asd.finetune import FinetuneConfig
    return with_fields(FinetuneConfig, "FinetuneNode", [_train(None)])


def _ae():
    from asd.baselines.autoencoder import AEConfig, default_train_config
    return with_fields(AEConfig, "AENode", [_train(default_train_config)])


def _embed():
    from asd.embed import EmbedConfig
    return with_fields(EmbedConfig, "EmbedNode", [
        ("tag", str, dataclasses.field(default="???")),  # <root>/embeddings/<tag>: each option names it
        ("after", Optional[str], dataclasses.field(default=None)),  # pipeline: embed once this stage has run
    ])


def _method_embed():
    from asd.embed import EmbedConfig
    return EmbedConfig


def _score():
    from asd.score import ScoreConfig
    return ScoreConfig


def _cluster():
    from asd.ward import ClusterConfig
    return ClusterConfig


def _featurize():
    from asd.featurize import FeaturizeConfig
    return with_fields(FeaturizeConfig, "FeaturizeNode")


def _train_node():
    from asd.loop import TrainConfig
    return with_fields(TrainConfig, "TrainNode")


# group -> how to build its schema; built (and the stage module imported) only when a job needs it,
# so a featurize or rescoring job's driver does not import torch for the training stages' configs
_BUILDERS: dict[str, Callable[[], type]] = {
    "pretrain": _pretrain,
    "finetune": _finetune,
    "embed": _embed,
    "score": _score,
    "cluster": _cluster,
    "featurize": _featurize,
    "ae": _ae,
    "method_embed": _method_embed,
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
