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

Registration happens on import of ``jobs`` (``jobs/__init__.py``), before any job composes.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from asd.baselines.autoencoder import AEConfig, default_train_config
from asd.embed import EmbedConfig
from asd.featurize import FeaturizeConfig
from asd.finetune import FinetuneConfig
from asd.loop import TrainConfig
from asd.pretrain import PretrainConfig
from asd.score import ScoreConfig
from asd.ward import ClusterConfig

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


TrainNode = with_fields(TrainConfig, "TrainNode")


def _train(factory=TrainConfig) -> tuple[str, Any, dataclasses.Field]:
    """A stage's ``train:`` node (``factory``'s values); its Ray Train run (and checkpoint folder) is
    named after the stage's tag."""
    def node():
        values = {k: v for k, v in dataclasses.asdict(factory()).items() if k not in TEST_ONLY}
        return TrainNode(**{**values, "name": "${..tag}"})
    return ("train", TrainNode, dataclasses.field(default_factory=node))


PretrainNode = with_fields(PretrainConfig, "PretrainNode", [_train()])
FinetuneNode = with_fields(FinetuneConfig, "FinetuneNode", [_train()])
AENode = with_fields(AEConfig, "AENode", [_train(default_train_config)])
FeaturizeNode = with_fields(FeaturizeConfig, "FeaturizeNode")
EmbedNode = with_fields(EmbedConfig, "EmbedNode", [
    ("tag", str, dataclasses.field(default="???")),  # <root>/embeddings/<tag>: each option names it
    ("after", Optional[str], dataclasses.field(default=None)),  # pipeline: embed once this stage has run
])

GROUPS: dict[str, type] = {
    "pretrain": PretrainNode,
    "finetune": FinetuneNode,
    "embed": EmbedNode,
    "score": ScoreConfig,
    "cluster": ClusterConfig,
    "featurize": FeaturizeNode,
    "ae": AENode,
    "method_embed": EmbedConfig,
}


def register() -> None:
    """Store every group's schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for group, node in GROUPS.items():
        cs.store(group=group, name=SCHEMA, node=node)
