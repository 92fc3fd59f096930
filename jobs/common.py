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
    """A training stage's config node -> (its dataclass, the ``train:`` part as asd.loop.TrainConfig)."""
    from asd.loop import TrainConfig

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
    print(json.dumps(payload, default=_jsonable, sort_keys=True), flush=True)


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:
        pass
    return str(obj)


# config keys that name storage locations (anywhere in a job's config)
PATH_KEYS = {"root", "input", "output", "out", "inbox", "labels", "init_checkpoint", "checkpoint", "storage_path"}
# ... and those a job writes to, which must lie under the run's storage root
WRITE_KEYS = {"output", "storage_path"}


def check_paths(cfg: DictConfig | dict) -> None:
    """Refuse a job whose paths are malformed (``..``, other schemes) or that would write
    outside its storage root (``root``), before anything starts."""
    from asd import storage

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


# embedders that run a model (the ones a GPU helps); log-mel statistics stay on CPUs
MODEL_EMBEDDERS = {"encoder", "concat"}


def apply_device(cfg: DictConfig) -> DictConfig:
    """Merge the ``device`` group (``jobs/conf/device``) into every stage of a job's config: its
    ``train`` into each training stage's ``train:`` node (pre-training, fine-tuning, the AE baseline),
    its ``embed`` into each model-backed embedding config, its ``score`` into each kNN scoring
    config. The one place where a job says GPUs or CPUs (a key the stage's dataclass lacks fails
    when the stage builds it)."""
    device = cfg.get("device")
    if not device:
        return cfg
    parts = {name: OmegaConf.to_container(device[name], resolve=True) if device.get(name) else {}
             for name in ("train", "embed", "score")}

    def merge(node: DictConfig, values: dict) -> None:
        for k, v in values.items():
            node[k] = v

    def walk(node, key: str | None) -> None:
        if not isinstance(node, DictConfig):
            return
        if key == "train" and "steps" in node and "use_gpu" in node:
            merge(node, parts["train"])
        elif "num_actors" in node and "num_gpus" in node and (key == "embed" or "embedder" in node):
            if node.get("embedder", "encoder") in MODEL_EMBEDDERS:  # rescore's embed: the served model's
                merge(node, parts["embed"])
        elif "threshold_method" in node and "k" in node:
            merge(node, parts["score"])
        for k in list(node.keys()):
            if k not in ("device", "hydra"):
                walk(node._get_node(k), str(k))

    with open_dict(cfg):
        walk(cfg, None)
    return cfg


def run_job(cfg: DictConfig, run) -> None:
    """The body of every job's Hydra ``main``: logging, path checks, Ray, the stage, its final JSON line."""
    setup_logging(cfg.log_level)
    apply_device(cfg)
    apply_input(cfg)
    check_paths(cfg)
    init_ray(cfg.ray)
    final_line(run(cfg))
