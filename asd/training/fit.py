"""Training on a Ray cluster: :func:`fit` runs any objective's :func:`asd.training.loop.train_loop` on Ray
Train workers, with checkpoints, resume and DDP.

* :func:`fit` (driver): checks that the cluster can place the workers (:mod:`asd.resources`),
  reads ``<root>/features`` as a Ray Dataset (training splits only; shards that fit ``cache_mb``
  are cached in each worker, larger ones stream with their blocks in random order), starts a
  :class:`ray.train.torch.TorchTrainer` with ``num_workers`` workers (fractional CPUs, or GPUs),
  checkpoints to ``storage_path`` (local or ``s3://``) and returns a :class:`TrainResult`.
  Rerunning with the same ``storage_path``/``name`` continues from the latest checkpoint (Ray
  Train V2 restores the run from storage); ``resume=False`` starts over. A corrupt latest
  checkpoint is skipped for the previous kept one (:mod:`asd.training.checkpoints`).
* :func:`train_plain`: the same loop without Ray (one process, or one per GPU under ``torchrun``).

The pieces live apart: the loop and :class:`~asd.training.loop.TrainConfig` in :mod:`asd.training.loop`, batches
in :mod:`asd.training.batches`, checkpoints and export in :mod:`asd.training.checkpoints`, test-only fault
injection in :mod:`asd.training.faults`; import each name from the module that defines it.

Ray Train 2.60 notes (Train V2 is the default, ``RAY_TRAIN_V2_ENABLED=1``):
``ray.train.report`` is a barrier every worker must call equally often; only rank 0's
metrics are kept, and only together with a checkpoint (``Result.metrics`` is the latest
checkpoint's metrics), so the loss history travels inside the checkpoint and in rank 0's
return value (``Result.return_value``). ``ray.train.get_checkpoint()`` gives the latest
checkpoint after a worker-group restart (``FailureConfig(max_failures)``) and when a finished
or crashed run is started again under the same storage path and name. ``storage_filesystem``
takes a pyarrow filesystem; we always pass the project's (:func:`asd.io.storage.arrow_filesystem`),
so the moto / AWS endpoint comes from the environment like everywhere else.
"""


from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
import torch.nn as nn

from asd.io import layout, storage
from asd.resources import require as require_resources
from asd.stores.features import MATRICES, matrix_columns, read_features_ray, read_features_table
from asd.training.batches import FeatureBatches, fbank_norm, table_batches
from asd.training.checkpoints import (
    META_FILE,
    STATE_FILE,
    checkpoint_dir_name,
    load_state_with_fallback,
)
from asd.training.faults import fault_hook
from asd.training.loop import (
    LoopResult,
    Objective,
    TrainConfig,
    cuda_precision,
    train_loop,
)

log = logging.getLogger(__name__)


def train_plain(
    objective: Objective, features_root: str, cfg: TrainConfig, *, norm: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
) -> LoopResult:
    """The same training without Ray: one process, or one per GPU under ``torchrun`` (DDP over
    NCCL / gloo from the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` environment). Every rank reads the
    committed features itself and takes every ``WORLD_SIZE``-th training row; nothing is
    checkpointed. For checking the loop on a machine without Ray (see ``python -m asd.stages.pretrain``).
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        cuda_precision(cfg)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    matrix = getattr(objective, "input", "fbank")
    cols = list(dict.fromkeys(matrix_columns(matrix) + ["clip_id", "split"] + list(objective.columns)))
    table = read_features_table(features_root, columns=cols)
    table = table.filter(pa.compute.is_in(table.column("split"), pa.array(list(cfg.splits))))
    source = FeatureBatches(table_batches(table, cfg, rank, world), cfg, columns=objective.columns, matrix=matrix,
                            norm=tuple(norm) if norm is not None else fbank_norm(cfg, features_root), rank=rank,
                            cache=True, weights=getattr(objective, "sample_weights", None))

    def wrap(module: nn.Module) -> nn.Module:
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=bool(objective.find_unused_parameters))

    return train_loop(objective, source, cfg, device=device, rank=rank, world_size=world,
                      wrap=wrap if world > 1 else None)


# ----------------------------------------------------------------------------- Ray Train


def _load_state(checkpoint, run_uri: str) -> tuple[dict, str, list[str]]:
    """Ray Train's latest checkpoint of the run ``run_uri`` (see :func:`load_state_with_fallback`)."""
    return load_state_with_fallback(storage.join(run_uri, os.path.basename(checkpoint.path.rstrip("/"))))


def _ray_worker(config: dict) -> dict | None:
    """``train_loop_per_worker``: one Ray Train worker."""
    import ray.train
    import ray.train.torch

    objective: Objective = config["objective"]
    cfg: TrainConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        cuda_precision(cfg)

    checkpoint = ray.train.get_checkpoint()
    resume_state, restored_from, unreadable = (
        _load_state(checkpoint, config["run_uri"]) if checkpoint is not None else (None, None, []))

    shard = ray.train.get_dataset_shard("train")

    def read_pass(epoch: int):
        return shard.iter_batches(
            batch_size=cfg.batch_size, batch_format="pyarrow", prefetch_batches=2,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed * 1000 + epoch * 10 + rank) if cfg.shuffle_buffer else None,
        )

    source = FeatureBatches(read_pass, cfg, columns=objective.columns, matrix=getattr(objective, "input", "fbank"),
                            norm=tuple(config["norm"]), rank=rank,
                            cache=bool(config["cache"]), weights=getattr(objective, "sample_weights", None))

    def wrap(module: nn.Module) -> nn.Module:
        kwargs = {"find_unused_parameters": bool(objective.find_unused_parameters)}
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index]
        return ray.train.torch.prepare_model(module, move_to_device=False, parallel_strategy="ddp",
                                             parallel_strategy_kwargs=kwargs)

    def on_checkpoint(state: dict | None, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if state is not None:
                torch.save(state, os.path.join(tmp, STATE_FILE))
                meta = {**metrics, "objective": objective.describe(), "world_size": world_size,
                        "norm": list(config["norm"]), "time": time.time()}
                with open(os.path.join(tmp, META_FILE), "w") as f:
                    json.dump(meta, f, default=str)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt,
                             checkpoint_dir_name=checkpoint_dir_name(metrics["step"], unreadable))

    res = train_loop(
        objective, source, cfg, device=device, rank=rank, world_size=world_size, resume_state=resume_state,
        wrap=wrap if world_size > 1 else None, on_checkpoint=on_checkpoint,
        before_step=fault_hook(cfg, config["run_uri"], rank, world_size),
    )
    import torch.distributed as dist

    summary = {"rank": rank, "param_checksum": res.param_checksum, "samples_per_s": res.samples_per_s,
               "steady_samples_per_s": res.steady_samples_per_s, "checkpoint_seconds": round(res.checkpoint_seconds, 2),
               "start_step": res.start_step, "step": res.step,
               "device": str(device), "restored_from": restored_from, "unreadable_checkpoints": unreadable}
    if device.type == "cuda":
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    summaries = [summary]
    if world_size > 1 and dist.is_initialized():
        summaries = [None] * world_size
        dist.all_gather_object(summaries, summary)
    if rank != 0:
        return None
    return {
        "start_step": res.start_step, "step": res.step, "epoch": res.epoch, "history": res.history,
        "final_loss": res.final_loss, "workers": summaries, "seconds": res.seconds,
        "resumed": resume_state is not None,
    }


@dataclass
class TrainResult:
    run: str  # the Ray Train run folder (URI)
    checkpoint: str | None  # URI of the latest checkpoint folder
    start_step: int  # step this (last) attempt started from: > 0 when it resumed
    step: int
    final_loss: float | None
    history: list[dict]
    workers: list[dict]  # per rank: param_checksum, samples_per_s, start/step
    seconds: float
    samples_per_s: float  # all workers together, whole attempt
    steady_samples_per_s: float  # all workers together, second half of the steps
    num_workers: int

    def to_dict(self, history: bool = False) -> dict:
        d = asdict(self)
        if not history:
            d.pop("history")
        return d


@dataclass
class StageResult:
    """What a training stage (pre-training, fine-tuning) returns: its run, latest checkpoint and
    exported encoder, and how training went (``train``: :meth:`TrainResult.to_dict` with history)."""

    checkpoint: str | None  # latest Ray Train checkpoint folder
    run: str  # Ray Train run folder
    encoder: str  # exported encoder.pt
    final_loss: float | None
    steps: int
    start_step: int
    seconds: float
    samples_per_s: float
    train: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _training_dataset(features_root: str, cfg: TrainConfig, columns: Iterable[str], matrix: str = "fbank",
                      streamed: bool = False):
    """The training rows as a Ray Dataset. ``streamed`` (shards too large to cache): the blocks
    (feature files, each of one machine type and section) come in a random order, so that the
    workers' local shuffle buffers mix machine types instead of passing one file at a time."""
    from ray.data.expressions import col

    cols = list(dict.fromkeys(matrix_columns(matrix) + ["clip_id", "split"] + list(columns)))
    ds = read_features_ray(features_root, columns=cols)
    cond = None
    for s in cfg.splits:
        c = col("split") == s
        cond = c if cond is None else (cond | c)
    ds = ds.filter(expr=cond)
    return ds.randomize_block_order(seed=cfg.seed) if streamed else ds


def _shard_megabytes(features_root: str, cfg: TrainConfig, matrix: str = "fbank") -> float:
    """Estimated in-memory size (MiB) of one worker's share of the training rows."""
    _, dtype, n_rows, n_cols = MATRICES[matrix]
    t = read_features_table(features_root, columns=["split", dtype] + [n for n in (n_rows, n_cols) if isinstance(n, str)])
    total = 0
    for r in t.to_pylist():
        if r["split"] in cfg.splits and r[dtype] is not None:
            size = np.prod([int(r[n]) if isinstance(n, str) else n for n in (n_rows, n_cols)])
            total += int(size) * np.dtype(r[dtype]).itemsize
    return total / cfg.num_workers / 2**20


def stage_train_config(cfg: TrainConfig, tag: str, out_root: str) -> TrainConfig:
    """A training stage's settings with its defaults filled in: the run named after the stage's
    ``tag`` (when left at TrainConfig's ``"train"``) and checkpoints under ``<out_root>/checkpoints``."""
    if cfg.name == "train":
        cfg = replace(cfg, name=tag)
    if not cfg.storage_path:
        cfg = replace(cfg, storage_path=layout.checkpoints_dir(out_root))
    return cfg


def run_dir(cfg: TrainConfig, features_root: str) -> tuple[str, str]:
    """(storage_path URI, run folder URI) of a training run."""
    storage_path = storage.absolute(cfg.storage_path or layout.checkpoints_dir(features_root))
    return storage_path, storage.join(storage_path, cfg.name)


def fit(objective: Objective, features_root: str, cfg: TrainConfig, norm: tuple[float, float] | None = None) -> TrainResult:
    """Train ``objective`` on the committed features of ``features_root`` with Ray Train."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    storage_path, run_uri = run_dir(cfg, features_root)
    storage.check_reachable(features_root)
    storage.check_reachable(storage_path, must_exist=False)
    if not cfg.resume:
        storage.remove(run_uri)
    if not ray.is_initialized():
        ray.init()
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    require_resources(resources, cfg.num_workers, f"training {objective.name} ({cfg.name})",
                      hint="Set the stage's train.use_gpu, train.num_workers or train.cpus_per_worker to what the "
                           "cluster has (e.g. pretrain.train.use_gpu=false on a CPU-only cluster).")
    norm = tuple(norm) if norm is not None else fbank_norm(cfg, features_root)
    matrix = getattr(objective, "input", "fbank")
    shard_mb = _shard_megabytes(features_root, cfg, matrix)
    if shard_mb == 0:
        raise ValueError(f"no training rows with {matrix!r} features (splits {list(cfg.splits)}) under "
                         f"{features_root!r}")
    cache = shard_mb <= cfg.cache_mb
    ds = _training_dataset(features_root, cfg, objective.columns, matrix, streamed=not cache)
    afs, fs_path = storage.arrow_filesystem(storage_path)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"objective": objective, "cfg": cfg, "norm": list(norm), "cache": cache, "run_uri": run_uri},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=fs_path,
            storage_filesystem=afs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ds},
    )
    log.info("training %s: %d workers, %d steps, shard ~%.1f MiB (%s), storage %s",
             objective.name, cfg.num_workers, cfg.steps, shard_mb, "cached" if cache else "streamed", run_uri)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    ret = result.return_value or {}
    ckpt_uri = None
    if result.checkpoint is not None:
        ckpt_uri = storage.join(run_uri, os.path.basename(result.checkpoint.path.rstrip("/")))
    workers = ret.get("workers", [])
    meta_step = int((result.metrics or {}).get("step", 0))
    return TrainResult(
        run=run_uri,
        checkpoint=ckpt_uri,
        start_step=int(ret.get("start_step", meta_step)),
        step=int(ret.get("step", meta_step)),
        final_loss=ret.get("final_loss", (result.metrics or {}).get("loss")),
        history=ret.get("history", []),
        workers=workers,
        seconds=time.perf_counter() - t0,
        samples_per_s=float(sum(w.get("samples_per_s", 0.0) for w in workers)),
        steady_samples_per_s=float(sum(w.get("steady_samples_per_s", 0.0) for w in workers)),
        num_workers=cfg.num_workers,
    )
