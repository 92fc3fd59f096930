"""Where stages run (:class:`DeviceConfig`), and failing fast when a stage asks the Ray cluster for
resources that none of its nodes has.

A :class:`DeviceConfig` is the one statement of where a job's stages run (the jobs' ``device``
config group: ``cpu`` or ``gpu``): the fields it sets on every training stage's
:class:`asd.training.loop.TrainConfig` (workers, GPUs per worker, precision), on every embedding
that runs a model (actors' GPUs) and on kNN scoring (the products on a GPU). Each stage's config is
built first, then the device's fields replace its own, in the few places that build them
(:class:`asd.recipes.run.RecipeRun`, the AE baseline, nightly rescoring).

Ray itself waits without end for a request it cannot place (GPUs on a CPU-only cluster, 4 CPUs per
worker on a 2-core machine) and says little about it. Before a training run or an actor pool
starts, :func:`require` compares what each worker needs with the nodes alive now and raises
:class:`MissingResources`, naming the resource, what the cluster has and the setting to change.

Autoscaling clusters (whose GPU nodes start on demand: ``cluster_configs/aws``) set
``ASD_RESOURCE_WAIT_S`` to the seconds a node may take to appear; the check then waits that long
for a node that fits before it fails. Unset, it waits :data:`DEFAULT_WAIT_S`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 5.0
WAIT_ENV = "ASD_RESOURCE_WAIT_S"


@dataclass
class DeviceConfig:
    """Fields of the stages' configs that say where they run (see the module docstring); empty:
    every stage keeps its own (CPU) settings."""

    train: dict = field(default_factory=dict)  # asd.training.loop.TrainConfig fields
    embed: dict = field(default_factory=dict)  # asd.stages.embed.EmbedConfig fields, for embedders that run a model
    score: dict = field(default_factory=dict)  # asd.stages.score.ScoreConfig fields

    def for_training(self, cfg):
        return replace(cfg, **self.train) if self.train else cfg

    def for_embedding(self, cfg, runs_a_model: bool):
        return replace(cfg, **self.embed) if self.embed and runs_a_model else cfg

    def for_scoring(self, cfg):
        return replace(cfg, **self.score) if self.score else cfg


class MissingResources(RuntimeError):
    """The cluster has no node (or not enough nodes) for what a stage asks."""


def wait_seconds() -> float:
    raw = os.environ.get(WAIT_ENV)
    if raw is None or raw == "":
        return DEFAULT_WAIT_S
    try:
        return max(0.0, float(raw))
    except ValueError as e:
        raise ValueError(f"{WAIT_ENV} must be a number of seconds, got {raw!r}") from e


def _node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def shortfall(per_worker: Mapping[str, float], workers: int, nodes: list[dict[str, float]]) -> str | None:
    """Why ``workers`` bundles of ``per_worker`` cannot be placed on ``nodes`` (each node's total
    resources), or None when they can: each node holds as many whole bundles as its scarcest
    resource allows, and the nodes' counts add up (zero amounts are ignored)."""
    need = {k: float(v) for k, v in per_worker.items() if v and float(v) > 0}
    if not need or workers <= 0:
        return None
    fit = [min(int(n.get(k, 0.0) // v + 1e-9) for k, v in need.items()) for n in nodes]
    if sum(fit) >= workers:
        return None
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    for k, v in sorted(need.items(), key=lambda kv: kv[0] == "CPU"):  # a missing accelerator first
        if not any(n.get(k, 0.0) >= v for n in nodes):
            return (f"no node has {v:g} {k} (the cluster has {have[k]:g} {k} in all, "
                    f"{max((n.get(k, 0.0) for n in nodes), default=0.0):g} on its largest node)")
    return (f"{workers} workers of {dict(need)} do not fit: the nodes hold {sum(fit)} "
            f"(cluster totals {have})")


def require(per_worker: Mapping[str, float], workers: int, what: str, hint: str = "",
            wait_s: float | None = None) -> None:
    """Raise :class:`MissingResources` unless ``workers`` bundles of ``per_worker`` fit on the live
    nodes of the connected Ray cluster, waiting up to ``wait_s`` (default: :func:`wait_seconds`) for
    nodes to join. ``what`` names the stage in the message, ``hint`` the setting that asks for it."""
    wait_s = wait_seconds() if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        why = shortfall(per_worker, workers, _node_resources())
        if why is None:
            return
        if time.monotonic() >= deadline:
            break
        log.info("%s: waiting for resources (%s)", what, why)
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    raise MissingResources(
        f"{what} cannot start: {why}." + (f" {hint}" if hint else "")
        + f" (Waited {wait_s:g} s; on an autoscaling cluster set {WAIT_ENV} to the seconds a node may take to start.)")
