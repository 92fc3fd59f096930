"""Glue shared by the Hydra entry points: logging, Ray start-up, config -> dataclass, final JSON line.

Nothing here knows about stages; ``asd`` never imports Hydra.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf, open_dict

T = TypeVar("T")
log = logging.getLogger("asd.jobs")


def to_dataclass(cls: type[T], node: DictConfig | dict | None, **extra: Any) -> T:
    """Build dataclass ``cls`` from a config node, recursing into nested dataclass fields.

    Unknown keys are an error (a typo in a config should not be ignored).
    """
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    data.update(extra)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"unknown keys for {cls.__name__}: {sorted(unknown)}; allowed: {sorted(fields)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        sub = hints.get(name)
        nested = dataclasses.is_dataclass(sub) and isinstance(value, dict)
        kwargs[name] = to_dataclass(sub, value) if nested else value
    return cls(**kwargs)


CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose_config(job: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """A job's composed config outside ``hydra.main`` (benchmarks, scripts): exactly what
    ``python -m jobs.<job> <overrides>`` would run with."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from jobs import schema

    schema.register()

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(job, overrides=list(overrides))


def stage_configs(node: DictConfig | dict, cls: type[T]) -> tuple[T, Any]:
    """A training stage's config node -> (its dataclass, the ``train:`` part as asd.training.loop.TrainConfig)."""
    from asd.training.loop import TrainConfig

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    train = data.pop("train", None) or {}
    return to_dataclass(cls, data), to_dataclass(TrainConfig, train)


def training_summary(stage: str, tag: str, res) -> tuple[dict, dict]:
    """A training stage's final-line dict (without the loss history) and its training details."""
    out = {"stage": stage, "tag": tag, **res.to_dict()}
    info = out.pop("train", {}) or {}
    out["workers"] = info.get("workers", [])
    out["steady_samples_per_s"] = info.get("steady_samples_per_s")
    return out, info


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def init_ray(ray_cfg: DictConfig | dict | None) -> None:
    """Connect to the cluster named by ``ray.address`` (None: start/attach a local one)."""
    import ray

    cfg = OmegaConf.to_container(ray_cfg, resolve=True) if isinstance(ray_cfg, DictConfig) else dict(ray_cfg or {})
    if ray.is_initialized():
        return
    address = cfg.get("address") or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": bool(cfg.get("log_to_driver", True))}
    if address:
        kwargs["address"] = address
    else:
        for key in ("num_cpus", "num_gpus", "object_store_memory"):
            if cfg.get(key) is not None:
                kwargs[key] = cfg[key]
        kwargs["include_dashboard"] = bool(cfg.get("include_dashboard", False))
    ray.init(**kwargs)
    ray_data_defaults()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = bool(cfg.get("progress", True))
    log.info("Ray: %s", ray.cluster_resources())


FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def ray_data_defaults(cpus: float | None = None) -> None:
    """Environment defaults for Ray Data in this process (a variable the user set wins); the one
    place they are decided, for jobs, tests (``tests/conftest.py``) and benchmarks alike.

    ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``: Ray Data 2.60 starts this many footer-reading actors
    for every Parquet read (default 32); on a small cluster they crowd out the real work (seen:
    scoring 108 s instead of seconds on 2 cores). Set to ``cpus`` (default: the connected cluster's
    CPU count), between 2 and 32 (README: "Ray Data settings")."""
    if FOOTER_ACTORS_ENV in os.environ:
        return
    if cpus is None:
        import ray

        cpus = ray.cluster_resources().get("CPU", 2)
    os.environ[FOOTER_ACTORS_ENV] = str(max(2, min(32, int(cpus))))
    log.info("%s=%s (%d CPUs; set it to override)", FOOTER_ACTORS_ENV, os.environ[FOOTER_ACTORS_ENV], int(cpus))


def final_line(payload: dict) -> None:
    """Print the job's one final JSON line (output locations, headline figures) on stdout."""
    from asd.io.storage import json_safe

    print(json.dumps(json_safe(payload), sort_keys=True), flush=True)


# config keys that name storage locations (anywhere in a job's config)
PATH_KEYS = {"root", "input", "output", "out", "inbox", "labels", "init_checkpoint", "checkpoint", "storage_path"}
# ... and those a job writes to, which must lie under the run's storage root
WRITE_KEYS = {"output", "storage_path"}


def check_paths(cfg: DictConfig | dict) -> None:
    """Refuse a job whose paths are malformed (``..``, other schemes) or that would write
    outside its storage root (``root``), before anything starts."""
    from asd.io import storage

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    # a job's storage root: ``output`` where the job names one (featurize), else ``root``
    root_key = "output" if isinstance(data.get("output"), str) else "root"
    root = data.get(root_key)
    if root is not None:
        storage.validate_uri(root, root_key)

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{where}.{k}" if where else str(k)
                if k in PATH_KEYS and isinstance(v, str):
                    storage.validate_uri(v, here, allow_parent=k not in WRITE_KEYS)
                    if k in WRITE_KEYS and root is not None and here != root_key and not storage.is_within(root, v):
                        raise ValueError(f"{here}={v!r} is outside the run's storage root {root!r}")
                else:
                    walk(v, here)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk({k: v for k, v in data.items() if k not in ("hydra",)}, "")


DATA_CONFIGS = CONF_DIR / "data"


def apply_input(cfg: DictConfig) -> DictConfig:
    """``input=<dir|s3://...>`` is short for ``data=dir data.input=<it>``: read an existing
    DCASE-layout corpus, generate nothing. Without it, ``input`` is the data group's ``input``."""
    with open_dict(cfg):
        # an input the user gave (not the ``${data.input}`` link set below); it replaces any data config
        # that is not already this plain directory, including a generating one whose own path it names
        given = cfg.get("input") and not OmegaConf.is_interpolation(cfg, "input")
        if given and ("data" not in cfg or cfg.data.get("generate", False) or cfg.input != cfg.data.get("input")):
            cfg.data = OmegaConf.create({"input": str(cfg.input), "generate": False})
        if "data" in cfg and not given:
            cfg.input = "${data.input}"
    return cfg


def refuse_path_as_data(argv: list[str] | None = None) -> None:
    """Exit with a message that says what to write when ``data=`` is given a path instead of
    one of the ``jobs/conf/data`` configs (Hydra would only say it cannot find ``data/<path>``)."""
    options = sorted(p.stem for p in DATA_CONFIGS.glob("*.yaml"))
    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") != "data" or value in options:
            continue
        if any(c in value for c in "/\\:") or value.startswith((".", "~")) or os.path.exists(value):
            raise SystemExit(
                f"data={value}: 'data' picks a corpus config ({', '.join(options)}), not a path. "
                f"To read the corpus at {value}, write input={value} "
                f"(the same as data=dir data.input={value}).")


def device_config(cfg: DictConfig):
    """The job's ``device`` group as :class:`asd.resources.DeviceConfig`: the one statement of where
    its stages run, which every stage config the job builds is given."""
    from asd.resources import DeviceConfig

    return to_dataclass(DeviceConfig, cfg.get("device") or {})


def recipe_from_config(node: DictConfig | dict):
    """A ``recipe`` config node (``jobs/conf/recipe``) as :class:`asd.recipes.recipe.Recipe`."""
    from asd.recipes.recipe import EmbedEntry, Labels, Model, Pretrain, Recipe
    from asd.stages.finetune import FinetuneConfig
    from asd.stages.pretrain import PretrainConfig
    from asd.stages.pseudo_label import PseudoLabelConfig

    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    pretrain = Pretrain(*stage_configs(d["pretrain"], PretrainConfig)) if d.get("pretrain") else None
    labels = None
    if d.get("labels"):
        lab = dict(d["labels"])
        labels = Labels(**{**lab, "cluster": to_dataclass(PseudoLabelConfig, lab.get("cluster") or {})})
    models = {}
    for name, m in (d.get("models") or {}).items():
        m = dict(m)
        checkpoint = m.pop("checkpoint", None)
        models[name] = Model(*stage_configs(m, FinetuneConfig), checkpoint=checkpoint)
    return Recipe(name=d["name"], title=d.get("title", ""), pretrain=pretrain, encoder=d.get("encoder"),
                  labels=labels, models=models, embed=[to_dataclass(EmbedEntry, e) for e in d.get("embed") or []],
                  fusion=d.get("fusion", "score"), score=dict(d.get("score") or {}))


def compose_recipes(cfg: DictConfig, names, overrides=None) -> dict:
    """``{name: Recipe}`` of the named recipes (``jobs/conf/recipe/<name>.yaml``), each composed as
    ``recipe=<name>`` would compose it. The job's own ``recipe`` (the served one, with the command
    line's ``recipe.*`` overrides) stands for its name. ``overrides`` (default: the job's
    ``recipe_overrides``, e.g. ``[models.cnn.train.steps=100]``) apply to every recipe that has the key."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    from jobs import schema

    schema.register()
    overrides = list(cfg.get("recipe_overrides") or []) if overrides is None else list(overrides)

    def node_of(name: str) -> DictConfig:
        if "recipe" in cfg and name == cfg.recipe.name:
            return cfg.recipe
        try:
            return _compose_served([f"recipe={name}"])
        except MissingConfigException:
            known = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))
            raise ValueError(f"unknown recipe {name!r}: no recipe/{name}.yaml (jobs/conf/recipe has {known}; "
                             "--config-dir adds a folder of your own)") from None

    def _compose_served(args: list[str]) -> DictConfig:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra job
            return compose(config_name="served", overrides=args).recipe
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name="served", overrides=args).recipe

    out = {}
    for name in names:
        if name in out:
            raise ValueError(f"recipe {name!r} listed twice")
        node = node_of(name)
        if node.name != name:
            raise ValueError(f"jobs/conf/recipe/{name}.yaml names itself {node.name!r}")
        apply = [o.split("=", 1) for o in overrides
                 if OmegaConf.select(node, o.split("=", 1)[0], default=_ABSENT) is not _ABSENT]
        if apply:
            node = node.copy()
            for key, value in apply:
                OmegaConf.update(node, key, _yaml_value(value), merge=False)
        out[name] = recipe_from_config(node)
    return out


_ABSENT = object()


def _yaml_value(text: str):
    """A command-line value as Hydra reads it (numbers, booleans, null, lists)."""
    import yaml

    return yaml.safe_load(text)


def recipe_run(cfg: DictConfig, stages, split=None, fresh: bool = False):
    """The job's :class:`asd.recipes.run.RecipeRun` on ``cfg.root``: its embedding, scoring and
    device settings; ``split`` (default: the corpus's own train and test folders)."""
    from asd.recipes.run import RecipeRun, Split
    from asd.stages.embed import EmbedConfig
    from asd.stages.score import ScoreConfig

    embed = to_dataclass(EmbedConfig, cfg.embed) if "embed" in cfg else None
    score = to_dataclass(ScoreConfig, cfg.score) if "score" in cfg else None
    return RecipeRun(cfg.root, split or Split(cfg.root), embed=embed, score=score, device=device_config(cfg),
                     stages=stages, fresh=fresh)


def run_job(cfg: DictConfig, run) -> None:
    """The body of every job's Hydra ``main``: logging, path checks, Ray, the stage, its final JSON line."""
    setup_logging(cfg.log_level)
    apply_input(cfg)
    check_paths(cfg)
    init_ray(cfg.ray)
    final_line(run(cfg))
