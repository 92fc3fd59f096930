"""The shared Ray Train loop: workers, DDP, checkpoints, resume, bf16.

An *objective* (:class:`Objective`) says what is trained (self-supervised pre-training in
:mod:`asd.pretrain`, attribute classification in :mod:`asd.finetune`, the autoencoder baseline in
:mod:`asd.baselines.autoencoder`); this module does everything else:

* :func:`fit` (driver): reads ``<root>/features`` as a Ray Dataset (training splits only),
  starts a :class:`ray.train.torch.TorchTrainer` with ``num_workers`` workers (fractional
  CPUs, or one GPU each), checkpoints to ``storage_path`` (local or ``s3://``) and returns a
  :class:`TrainResult`. Rerunning with the same ``storage_path``/``name`` continues the run
  from its latest checkpoint (Ray Train V2 restores the run from storage); ``resume=False``
  starts over. A latest checkpoint whose ``state.pt`` is corrupt is skipped, with a warning,
  for the previous kept one (:func:`load_state_with_fallback`, also behind
  :func:`load_training_state` and :func:`export_encoder`); none readable is an error.
* :func:`train_loop` (per worker, no Ray needed): optimizer (AdamW, no decay on norms and
  biases), linear warm-up + cosine LR, gradient accumulation (``no_sync`` on the micro-steps
  before the last), gradient clipping, bf16 autocast on CUDA, the objective's hook after
  every optimizer step (EMA teacher), periodic checkpoints through a callback, a step count
  that continues on resume. Plain ``torch.distributed`` + DDP can drive it without Ray.
* :class:`FeatureBatches`: feature rows (Arrow) -> normalised random crops of
  ``crop_frames`` frames (short clips are tiled), reshuffled every epoch; small shards are
  cached in worker memory after the first pass, so later epochs cost no Ray Data start-up.
* :func:`export_encoder`: the trained encoder to
  ``<root>/models/<tag>/encoder.pt`` (+ ``config.json``).

Ray Train 2.60 notes (Train V2 is the default, ``RAY_TRAIN_V2_ENABLED=1``):
``ray.train.report`` is a barrier every worker must call equally often; only rank 0's
metrics are kept, and only together with a checkpoint (``Result.metrics`` is the latest
checkpoint's metrics, ``Result.metrics_dataframe`` one row per *kept* checkpoint), so the
loss history travels inside the checkpoint and in rank 0's return value
(``Result.return_value``). ``ray.train.get_checkpoint()`` gives the latest checkpoint after
a worker-group restart (``FailureConfig(max_failures)``) and when a finished or crashed run
is started again under the same storage path and name. ``resume_from_checkpoint`` is gone:
an initial model is the objective's business (e.g. ``PretrainConfig.init_checkpoint``).
``storage_filesystem`` takes a pyarrow filesystem; we always pass the project's
(:func:`asd.storage.arrow_filesystem`), so the moto / AWS endpoint comes from the
environment like everywhere else.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
import torch.nn as nn

from asd import layout, storage
from asd.features import (
    matrix_array,
    matrix_columns,
    read_features_ray,
    read_features_table,
)
from asd.models.encoder import FBANK_MEAN, FBANK_STD, AudioEncoder, save_checkpoint
from asd.resources import require as require_resources

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Optimisation, data and Ray Train settings shared by every training stage."""

    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 16  # clips per worker per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 5e-4
    min_lr_ratio: float = 0.01  # cosine floor, as a fraction of lr
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant (both after the linear warm-up)
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # workers
    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu (fractional: several workers share one GPU)
    cpus_per_worker: float = 0.5  # fractional: 2 workers fit on 2 cores beside Ray Data
    torch_threads: int | None = None  # per worker; None = max(1, int(cpus_per_worker))
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on CPU)
    tf32: bool = True  # float32 matmuls and convolutions in TF32 on CUDA (Ampere and later; ignored on CPU)
    compile: bool = False  # torch.compile the module (nn.Module.compile: in place, state_dict keys unchanged)
    activation_checkpointing: bool = False  # recompute transformer blocks in backward (memory for compute)
    # data
    crop_frames: int = 512  # random crop per clip and step (multiple of 16; short clips tiled)
    splits: tuple[str, ...] = ("train",)  # feature rows used for training
    shuffle_buffer: int = 256  # Ray Data local shuffle buffer (rows) while streaming
    cache_mb: float = 2048.0  # cache a worker's shard in memory when it is smaller than this
    norm: str = "beats"  # beats: BEATs' fbank constants | stats: scalar mean/std of _stats
    # checkpoints and faults
    checkpoint_every: int = 100  # steps; the last step is always checkpointed
    num_to_keep: int = 2
    max_failures: int = 2  # worker-group restarts from the latest checkpoint
    storage_path: str | None = None  # dir or s3://...; None = <features root>/checkpoints
    name: str = "train"  # run folder under storage_path
    resume: bool = True  # continue an existing run of the same name (False: start over)
    seed: int = 0
    log_every: int = 10
    fail_at_step: int | None = None  # fault injection (tests): one worker fails at this step,
    fail_rank: int = -1  # on this rank (negative: from the end), the first time only
    fail_mode: str = "raise"  # raise | exit (os._exit: the worker process dies)
    fail_wait_s: float = 60.0  # before failing, wait (at most this long) until Ray Train has registered the last checkpoint

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.splits = tuple(self.splits)
        if self.crop_frames % 16 or self.crop_frames <= 0:
            raise ValueError(f"crop_frames must be a positive multiple of 16, got {self.crop_frames}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.norm not in ("beats", "stats"):
            raise ValueError(f"norm must be beats or stats, got {self.norm!r}")
        if self.fail_mode not in ("raise", "exit"):
            raise ValueError(f"fail_mode must be raise or exit, got {self.fail_mode!r}")
        if self.grad_accum < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("grad_accum, batch_size and num_workers must be >= 1")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError(f"gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")


# ----------------------------------------------------------------------------- objective


@runtime_checkable
class Objective(Protocol):
    """What a training stage plugs into :func:`train_loop` (must be picklable: it is shipped
    to the Ray workers and rebuilt there)."""

    name: str
    columns: tuple[str, ...]  # feature columns the objective needs besides its matrix (e.g. attributes)
    input: str  # the feature matrix it trains on (asd.featurize.MATRICES), batched as batch["fbank"]
    find_unused_parameters: bool

    def build(self) -> nn.Module:
        """The trainable module (wrapped by DDP), with an ``encoder`` to export."""

    def initialize(self, module: nn.Module) -> None:
        """Fresh start only (not on resume): e.g. load a general-purpose checkpoint."""

    def setup(self, module: nn.Module, device: torch.device) -> None:
        """After the module is on its device, before DDP: extra state (an EMA teacher)."""

    def step(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch (``model`` may be DDP-wrapped: call it, not its parts)."""

    def after_optimizer_step(self, module: nn.Module, step: int, total_steps: int) -> dict | None:
        """Hook after every optimizer step (``step`` = completed steps); may return logs."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def encoder(self, module: nn.Module) -> AudioEncoder:
        """The encoder to export from the (unwrapped) module."""


class ObjectiveBase:
    """Defaults for the optional parts of :class:`Objective`."""

    name = "objective"
    columns: tuple[str, ...] = ()
    input = "fbank"
    find_unused_parameters = False

    def initialize(self, module: nn.Module) -> None:
        pass

    def setup(self, module: nn.Module, device: torch.device) -> None:
        pass

    def after_optimizer_step(self, module: nn.Module, step: int, total_steps: int) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def encoder(self, module: nn.Module) -> AudioEncoder:
        return module.encoder

    def clip_groups(self, module: nn.Module) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradient norms are clipped separately (``grad_clip``): one
        group, the whole module, unless the module trains independent models side by side."""
        return [list(module.parameters())]

    def describe(self) -> dict:
        """JSON-able description stored in checkpoints and exported models."""
        return {"objective": self.name}


# ----------------------------------------------------------------------------- data


def fbank_norm(cfg: TrainConfig, root: str | None = None) -> tuple[float, float]:
    """Scalar (mean, std) used as ``(fbank - mean) / (2 * std)`` (BEATs' form)."""
    if cfg.norm == "beats" or root is None:
        return FBANK_MEAN, FBANK_STD
    from asd.features import load_stats

    stats = load_stats(root)["all"]
    mean = np.asarray(stats["mean"], np.float64)
    std = np.asarray(stats["std"], np.float64)
    m = float(mean.mean())
    s = float(np.sqrt(np.mean(std**2 + mean**2) - m**2))
    return m, s


def crop_batch(arrays: list[np.ndarray], crop: int, rng: np.random.Generator, mean: float, std: float) -> torch.Tensor:
    """(B, crop, bins) normalised random crops; clips shorter than ``crop`` are tiled
    (wrap-around from a random offset), so no padding mask is needed."""
    bins = arrays[0].shape[1]
    out = np.empty((len(arrays), crop, bins), np.float32)
    for i, a in enumerate(arrays):
        frames = a.shape[0]
        if frames >= crop:
            start = int(rng.integers(0, frames - crop + 1))
            out[i] = a[start : start + crop]
        else:
            offset = int(rng.integers(0, frames))
            idx = (offset + np.arange(crop)) % frames
            out[i] = a[idx]
    out -= mean
    out /= 2.0 * std
    return torch.from_numpy(out)


class FeatureBatches:
    """Epochs of training batches ``{"fbank": (B, crop, bins) float32, <column>: list}``; the
    ``"fbank"`` entry holds the feature matrix ``matrix`` (log-mel by default, or the modulation
    spectrum ``mod``) whatever it is.

    ``read_pass(epoch)`` yields Arrow batches of feature rows for one pass (a Ray Data
    shard's ``iter_batches``, or slices of a table). With ``cache=True`` the whole pass is
    read once, kept in memory (fbank as stored, float16) in ``clip_id`` order, and every
    epoch is a fresh permutation of it; otherwise every epoch streams a new pass. Orders are
    seeded by (seed, rank, epoch) and crops by (seed, rank, epoch, batch), so a run resumed
    inside an epoch (``skip``) sees exactly the batches the uninterrupted run would have.

    ``weights(extras) -> (n,)`` (an objective's ``sample_weights``, mean about 1 over the
    training set) turns an epoch into weighted sampling: cached, an epoch draws as many rows as
    there are, with replacement, in proportion to the weights; streamed, each row is repeated
    ``floor(w)`` or ``ceil(w)`` times (stochastic rounding) and the repeats spread by the batches.
    """

    def __init__(
        self,
        read_pass: Callable[[int], Iterable[pa.Table | pa.RecordBatch]],
        cfg: TrainConfig,
        *,
        columns: Iterable[str] = (),
        matrix: str = "fbank",
        norm: tuple[float, float] = (FBANK_MEAN, FBANK_STD),
        rank: int = 0,
        cache: bool = False,
        weights: Callable[[list[dict]], np.ndarray] | None = None,
    ):
        self.read_pass = read_pass
        self.weights = weights
        self.cfg = cfg
        self.columns = tuple(columns)
        self.matrix_cols = matrix_columns(matrix)
        self.matrix = matrix
        self.norm = norm
        self.rank = rank
        self.cache = cache
        self._cached: list[tuple[np.ndarray, dict, str]] | None = None
        self._w: np.ndarray | None = None

    def _rows(self, batch) -> list[tuple[np.ndarray, dict, str]]:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        names = set(batch.column_names)
        wanted = self.matrix_cols + [c for c in self.columns if c not in self.matrix_cols]
        if "clip_id" in names and "clip_id" not in wanted:
            wanted.append("clip_id")
        return [(matrix_array(r, self.matrix, as_stored=True), {c: r[c] for c in self.columns},
                 str(r.get("clip_id") or "")) for r in batch.select(wanted).to_pylist()]

    def _collate(self, rows: list, epoch: int, index: int) -> dict:
        rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, index, 2])
        arrays = [a.astype(np.float32) for a, _, _ in rows]
        batch: dict[str, Any] = {"fbank": crop_batch(arrays, self.cfg.crop_frames, rng, *self.norm)}
        for c in self.columns:
            batch[c] = [extra[c] for _, extra, _ in rows]
        return batch

    def _cached_weights(self) -> np.ndarray:
        if self._w is None:
            w = np.asarray(self.weights([extra for _, extra, _ in self._cached]), np.float64)
            if w.shape != (len(self._cached),) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
                raise ValueError("sample weights must be finite, non-negative, one per row, and not all zero")
            self._w = w
        return self._w

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """The batches of one epoch, the first ``skip`` left out (resume inside an epoch)."""
        bs = self.cfg.batch_size
        if self.cache and self._cached is None:
            rows = [row for part in self.read_pass(epoch) for row in self._rows(part)]
            if not rows:
                return
            self._cached = sorted(rows, key=lambda r: r[2])
        if self._cached is not None:
            rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, 1])
            if self.weights is not None:
                w = self._cached_weights()
                order = rng.choice(len(self._cached), size=len(self._cached), replace=True, p=w / w.sum())
            else:
                order = rng.permutation(len(self._cached))
            for i, start in enumerate(range(0, len(order), bs)):
                if i >= skip:
                    yield self._collate([self._cached[j] for j in order[start : start + bs]], epoch, i)
            return
        pending: list = []
        index = 0
        rng = np.random.default_rng([self.cfg.seed, self.rank, epoch, 3])
        for part in self.read_pass(epoch):
            rows = self._rows(part)
            if self.weights is not None and rows:
                w = np.asarray(self.weights([extra for _, extra, _ in rows]), np.float64)
                reps = np.floor(w).astype(int) + (rng.random(len(w)) < w - np.floor(w))
                rows = [rows[i] for i in rng.permutation(np.repeat(np.arange(len(rows)), reps))]
            pending.extend(rows)
            while len(pending) >= bs:
                chunk, pending = pending[:bs], pending[bs:]
                if index >= skip:
                    yield self._collate(chunk, epoch, index)
                index += 1
        if pending and index >= skip:
            yield self._collate(pending, epoch, index)


def table_batches(table: pa.Table, cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> Callable[[int], Iterator[pa.Table]]:
    """``read_pass`` over an in-memory table of feature rows (no Ray): this rank's share,
    reshuffled per epoch."""
    share = table.take(list(range(rank, table.num_rows, world_size)))

    def read_pass(epoch: int) -> Iterator[pa.Table]:
        order = np.random.default_rng([cfg.seed, rank, epoch, 2]).permutation(share.num_rows)
        shuffled = share.take(order)
        for start in range(0, shuffled.num_rows, cfg.batch_size):
            yield shuffled.slice(start, cfg.batch_size)

    return read_pass


# ----------------------------------------------------------------------------- loop


@dataclass
class LoopResult:
    start_step: int
    step: int
    epoch: int
    history: list[dict]
    final_loss: float | None
    seconds: float
    samples_per_s: float  # clips per second on this worker, whole attempt (data start-up included)
    steady_samples_per_s: float  # clips per second over the second half of the attempt's steps, checkpoints left out
    param_checksum: str
    checkpoint_seconds: float = 0.0  # time spent handing checkpoints over (on_checkpoint), whole attempt
    module: nn.Module | None = field(default=None, repr=False)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, gains and embeddings-like 1-D tensors."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "weight_g" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_checksum(module: nn.Module) -> str:
    """sha256 over every parameter's bytes (identical weights <=> identical checksum)."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap(module).state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP wrappers (``nn.Module.compile`` compiles in place: nothing to unwrap)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def set_activation_checkpointing(module: nn.Module, on: bool) -> int:
    """Turn activation checkpointing on or off in every transformer block stack of ``module``
    (:class:`asd.models.encoder.TransformerEncoder`); returns how many stacks it set. A module
    without one (a CNN) cannot use it: ``ValueError``."""
    from asd.models.encoder import TransformerEncoder

    stacks = [m for m in module.modules() if isinstance(m, TransformerEncoder)]
    if on and not stacks:
        raise ValueError(f"activation_checkpointing needs a transformer encoder; {type(module).__name__} has none")
    for m in stacks:
        m.activation_checkpointing = on
    return len(stacks)


def _to_device(batch: dict, device: torch.device) -> dict:
    """Host tensors to ``device``; to CUDA through pinned memory, asynchronously, so the host
    prepares the next batch while the GPU works on this one (nothing else syncs before a log step)."""
    pin = device.type == "cuda"
    return {k: ((v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=True)
                if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _window_mean(values: list) -> float:
    """Mean of logged values (Python numbers or device scalars) with one device read per kind."""
    tensors = [v.float().reshape(()) for v in values if isinstance(v, torch.Tensor)]
    total = float(torch.stack(tensors).sum()) if tensors else 0.0
    return (total + sum(float(v) for v in values if not isinstance(v, torch.Tensor))) / max(1, len(values))


def _mean_across(values: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if world_size <= 1 or not dist.is_available() or not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world_size for k, v in zip(keys, t.tolist())}


def build_training_state(
    module: nn.Module, optimizer, scheduler, objective: Objective, *, step: int, epoch: int, batch_in_epoch: int,
    history: list[dict], cfg: TrainConfig, world_size: int,
) -> dict:
    """Everything a resumed run needs (loadable with ``torch.load(weights_only=True)``); a
    snapshot: tensors are copied, so later steps do not change it."""
    return _snapshot({
        "module": unwrap(module).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "objective": objective.state_dict(),
        "step": int(step),
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
        "history": json.loads(json.dumps(history)),
        "world_size": int(world_size),
        "config": json.loads(json.dumps(asdict(cfg), default=list)),
    })


def _snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def clip_gradients(groups: list[list[nn.Parameter]], max_norm: float) -> torch.Tensor:
    """Clip each group's gradient to a norm of at most ``max_norm`` (0: no clipping); returns the
    largest norm before clipping."""
    clip = max_norm if max_norm > 0 else float("inf")
    return torch.stack([torch.nn.utils.clip_grad_norm_(g, clip) for g in groups]).max()


def train_loop(
    objective: Objective,
    source: FeatureBatches,
    cfg: TrainConfig,
    *,
    device: torch.device | str | None = None,
    rank: int = 0,
    world_size: int = 1,
    resume_state: dict | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    on_checkpoint: Callable[[dict | None, dict], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> LoopResult:
    """Train ``objective`` for ``cfg.steps`` optimizer steps on one worker.

    Without Ray: ``wrap=lambda m: DistributedDataParallel(m.to(dev), ...)`` after
    ``torch.distributed.init_process_group`` (or ``wrap=None`` for one process).
    ``resume_state`` (see :func:`build_training_state`) restores module, optimizer, LR
    schedule, objective state (EMA teacher) and the step / epoch / batch position; the step
    count continues from there. ``on_checkpoint(state, metrics)`` is called on every rank
    every ``checkpoint_every`` steps and at the end (``state`` only on rank 0, None
    elsewhere). ``before_step(step)`` runs before each step (fault injection).
    """
    t_start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    module = objective.build().to(device)
    if resume_state is None:
        objective.initialize(module)
    objective.setup(module, device)
    optimizer = torch.optim.AdamW(
        param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    step, epoch, batch_in_epoch, history = 0, 0, 0, []
    if resume_state is not None:
        module.load_state_dict(resume_state["module"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        objective.load_state_dict(resume_state.get("objective") or {})
        step = int(resume_state["step"])
        epoch = int(resume_state.get("epoch", 0))
        batch_in_epoch = int(resume_state.get("batch_in_epoch", 0))
        history = list(resume_state.get("history") or [])
        log.info("rank %d: resuming at step %d (epoch %d, batch %d)", rank, step, epoch, batch_in_epoch)
    start_step = step
    clip_groups = (objective.clip_groups(module) if hasattr(objective, "clip_groups")
                   else [list(module.parameters())])
    if cfg.activation_checkpointing:
        set_activation_checkpointing(module, True)
    if cfg.compile:
        module.compile()  # in place: the same module object, parameters and state_dict keys
    model = wrap(module) if wrap is not None else module
    model.train()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.bf16 and device.type == "cuda") else contextlib.nullcontext()
    )
    position = {"epoch": epoch, "batch": batch_in_epoch}

    def micro_batches() -> Iterator[dict]:
        while True:
            got = 0
            for b in source.epoch(position["epoch"], skip=position["batch"]):
                position["batch"] += 1
                got += 1
                yield b
            if got == 0 and position["batch"] == 0:
                raise RuntimeError("the training data is empty (no feature rows in the selected splits)")
            position["epoch"] += 1
            position["batch"] = 0

    stream = micro_batches()
    window: dict[str, list[float]] = {}
    samples = 0
    t_loop = time.perf_counter()
    half = start_step + (cfg.steps - start_step) // 2  # steady-state throughput from here
    t_half, samples_half = None, 0
    ckpt_seconds, ckpt_half = 0.0, 0.0  # time in on_checkpoint: in total, and since the half-way step
    last_loss = None
    while step < cfg.steps:
        if before_step is not None:
            before_step(step)
        if step == half and t_half is None:
            t_half, samples_half = time.perf_counter(), samples
        # masks and other torch randomness: seeded per (seed, rank, step), so resuming is exact
        torch.manual_seed(cfg.seed * 1_000_003 + rank * 7_919 + step)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            batch = _to_device(next(stream), device)
            samples += int(batch["fbank"].shape[0])
            sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast:
                    loss, logs = objective.step(model, batch, step)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **logs}.items():  # device tensors stay there until a log step
                window.setdefault(k, []).append(v.detach() if isinstance(v, torch.Tensor) else float(v))
        grad_norm = clip_gradients(clip_groups, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        extra = objective.after_optimizer_step(module, step, cfg.steps) or {}
        window.setdefault("grad_norm", []).append(grad_norm.detach())
        for k, v in extra.items():
            window.setdefault(k, []).append(v.detach() if isinstance(v, torch.Tensor) else float(v))
        is_ckpt = step % max(1, cfg.checkpoint_every) == 0 or step == cfg.steps
        if step % max(1, cfg.log_every) == 0 or is_ckpt:  # the only host-device syncs of the logs
            means = _mean_across({k: _window_mean(v) for k, v in window.items()}, world_size, device)
            entry = {"step": step, "epoch": position["epoch"], "lr": scheduler.get_last_lr()[0], **means}
            history.append(entry)
            last_loss = entry.get("loss")
            window = {}
            if rank == 0:
                log.info("step %d/%d %s", step, cfg.steps, {k: round(v, 5) for k, v in entry.items() if k != "step"})
            if on_log is not None:
                on_log(entry)
        if is_ckpt and on_checkpoint is not None:
            state = None
            if rank == 0:
                state = build_training_state(
                    module, optimizer, scheduler, objective, step=step, epoch=position["epoch"],
                    batch_in_epoch=position["batch"], history=history, cfg=cfg, world_size=world_size,
                )
            metrics = {"step": step, "start_step": start_step, "epoch": position["epoch"],
                       "loss": last_loss if last_loss is not None else float("nan")}
            t_ckpt = time.perf_counter()
            on_checkpoint(state, metrics)
            spent = time.perf_counter() - t_ckpt
            ckpt_seconds += spent
            if t_half is not None:
                ckpt_half += spent
    t_end = time.perf_counter()
    seconds = t_end - t_loop
    train_time = (t_end - t_half - ckpt_half) if t_half is not None else 0.0
    steady = (samples - samples_half) / train_time if train_time > 0 else 0.0
    if last_loss is None and history:
        last_loss = history[-1].get("loss")
    return LoopResult(
        start_step=start_step, step=step, epoch=position["epoch"], history=history, final_loss=last_loss,
        seconds=t_end - t_start, samples_per_s=samples / seconds if seconds > 0 and samples else 0.0,
        steady_samples_per_s=steady, checkpoint_seconds=ckpt_seconds, param_checksum=param_checksum(module),
        module=module,
    )


def _cuda_precision(cfg: TrainConfig) -> None:
    """TF32 for the float32 matmuls left outside bf16 autocast (``cfg.tf32``; cuDNN convolutions
    use TF32 by PyTorch's default already)."""
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")


def train_plain(
    objective: Objective, features_root: str, cfg: TrainConfig, *, norm: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
) -> LoopResult:
    """The same training without Ray: one process, or one per GPU under ``torchrun`` (DDP over
    NCCL / gloo from the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` environment). Every rank reads the
    committed features itself and takes every ``WORLD_SIZE``-th training row; nothing is
    checkpointed. For checking the loop on a machine without Ray (see ``python -m asd.pretrain``).
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
        _cuda_precision(cfg)
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


class InjectedFault(RuntimeError):
    """Raised by ``fail_at_step`` fault injection."""


def _fault_hook(cfg: TrainConfig, run_uri: str, rank: int, world_size: int) -> Callable[[int], None] | None:
    if cfg.fail_at_step is None:
        return None
    target = cfg.fail_rank % world_size

    def hook(step: int) -> None:
        if step != cfg.fail_at_step or rank != target:
            return
        marker = storage.join(run_uri, "_faults", f"step-{step:08d}.json")
        if storage.exists(marker):  # already failed once here: this is the retry
            return
        storage.atomic_write_json(marker, {"step": step, "rank": rank, "mode": cfg.fail_mode, "time": time.time()})
        # Ray Train's controller registers a reported checkpoint when it next polls the workers; a
        # crash before that loses it, and the run resumes from the one before. Wait until the last
        # checkpoint is registered, so that tests know which step the run must resume from.
        expected = (step // cfg.checkpoint_every) * cfg.checkpoint_every
        if expected > 0 and not _wait_registered(run_uri, expected, cfg.fail_wait_s):
            log.warning("fault injection: checkpoint of step %d not registered after %.0f s", expected, cfg.fail_wait_s)
        log.warning("fault injection: rank %d fails at step %d (%s)", rank, step, cfg.fail_mode)
        if cfg.fail_mode == "exit":
            os._exit(17)
        raise InjectedFault(f"injected fault at step {step} on rank {rank}")

    return hook


def _wait_registered(run_uri: str, step: int, timeout_s: float) -> bool:
    """Wait until the run's latest registered checkpoint (``ray.train.Result.from_path``, what
    Ray Train restores from) is of ``step`` or later; False after ``timeout_s``."""
    from ray.train import Result

    afs, path = storage.arrow_filesystem(run_uri)
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        try:
            ckpt = Result.from_path(path, storage_filesystem=afs).checkpoint
        except RuntimeError:  # no checkpoint registered yet: the run's snapshot is not written
            ckpt = None
        key = _checkpoint_key(os.path.basename(ckpt.path.rstrip("/"))) if ckpt is not None else None
        if key is not None and key[0] >= step:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


class CheckpointUnreadable(RuntimeError):
    """A checkpoint folder without a readable training state (and, after the fallback, no
    readable older one either)."""


def _checkpoint_key(name: str) -> tuple[int, int] | None:
    """Order of checkpoint folder names ``step-XXXXXXXX`` (``-N``: re-written after a fallback)."""
    import re

    m = re.fullmatch(r"step-(\d+)(?:-(\d+))?", name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _split_uri(uri: str) -> tuple[str, str]:
    uri = str(uri).rstrip("/")
    if storage.is_remote(uri):
        parent, _, name = uri.rpartition("/")
        return parent, name
    return os.path.dirname(uri), os.path.basename(uri)


def _read_state(checkpoint_uri: str) -> dict:
    """``state.pt`` of one checkpoint folder; :class:`CheckpointUnreadable` when it is missing,
    truncated, not a torch file or not a training state (other storage errors propagate)."""
    uri = storage.join(checkpoint_uri, STATE_FILE)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise CheckpointUnreadable(f"{uri} is missing") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, pickle errors ...
        raise CheckpointUnreadable(f"{uri} is unreadable ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(state, dict) or "module" not in state or "step" not in state:
        raise CheckpointUnreadable(f"{uri} is not a training state")
    return state


def _older_checkpoints(checkpoint_uri: str) -> list[str]:
    """The other checkpoint folders of the same run folder older than ``checkpoint_uri``, newest first."""
    parent, name = _split_uri(checkpoint_uri)
    key = _checkpoint_key(name)
    fs, path = storage.filesystem(parent)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        other = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        k = _checkpoint_key(other)
        if e.get("type") == "directory" and k is not None and (key is None or k < key):
            found.append((k, storage.join(parent, other)))
    return [uri for _, uri in sorted(found, reverse=True)]


def load_state_with_fallback(checkpoint_uri: str) -> tuple[dict, str, list[str]]:
    """The training state of ``checkpoint_uri``; when that one is unreadable, the newest older
    readable checkpoint of the same run folder (the ones ``CheckpointConfig(num_to_keep)``
    kept), with a warning naming each unreadable one. Returns ``(state, URI of the checkpoint
    it came from, URIs of the unreadable checkpoints skipped)``; raises
    :class:`CheckpointUnreadable` when no checkpoint of the run is readable."""
    skipped: list[str] = []
    errors: list[str] = []
    for uri in [checkpoint_uri, *_older_checkpoints(checkpoint_uri)]:
        try:
            state = _read_state(uri)
        except CheckpointUnreadable as exc:
            log.warning("checkpoint %s is corrupt: %s; falling back to the previous kept checkpoint", uri, exc)
            skipped.append(uri)
            errors.append(str(exc))
            continue
        if skipped:
            log.warning("restoring step %d from %s instead of the corrupt checkpoint(s) %s",
                        int(state["step"]), uri, ", ".join(skipped))
        return state, uri, skipped
    raise CheckpointUnreadable(
        "no readable checkpoint at or before {1} in {0} (tried {2}): ".format(*_split_uri(checkpoint_uri), len(skipped))
        + "; ".join(errors) + ". Remove the run folder (or rerun with resume=false) to start over."
    )


def _load_state(checkpoint, run_uri: str) -> tuple[dict, str, list[str]]:
    """Ray Train's latest checkpoint of the run ``run_uri`` (see :func:`load_state_with_fallback`)."""
    return load_state_with_fallback(storage.join(run_uri, os.path.basename(checkpoint.path.rstrip("/"))))


def _checkpoint_dir_name(step: int, unreadable: Iterable[str] = ()) -> str:
    """``step-XXXXXXXX``, with a ``-N`` suffix when that folder holds a corrupt checkpoint
    that Ray Train still tracks: re-used, the folder would be deleted together with the old
    entry once ``num_to_keep`` rotates it out, taking the new checkpoint with it."""
    taken = {_split_uri(u)[1] for u in unreadable}
    name = base = f"step-{step:08d}"
    n = 0
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


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
        _cuda_precision(cfg)

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
                             checkpoint_dir_name=_checkpoint_dir_name(metrics["step"], unreadable))

    res = train_loop(
        objective, source, cfg, device=device, rank=rank, world_size=world_size, resume_state=resume_state,
        wrap=wrap if world_size > 1 else None, on_checkpoint=on_checkpoint,
        before_step=_fault_hook(cfg, config["run_uri"], rank, world_size),
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
    current: str | None  # models/CURRENT, when written
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
    _, dtype, n_rows, n_cols = matrix_columns(matrix)
    t = read_features_table(features_root, columns=["split", n_rows, n_cols, dtype])
    total = 0
    for r in t.to_pylist():
        if r["split"] in cfg.splits and r[dtype] is not None:
            total += int(r[n_rows]) * int(r[n_cols]) * np.dtype(r[dtype]).itemsize
    return total / cfg.num_workers / 2**20


def stage_train_config(cfg: TrainConfig, tag: str, out_root: str) -> TrainConfig:
    """A training stage's settings with its defaults filled in: the run named after the stage's
    ``tag`` (when left at TrainConfig's ``"train"``) and checkpoints under ``<out_root>/checkpoints``."""
    if cfg.name == "train":
        cfg = replace(cfg, name=tag)
    if not cfg.storage_path:
        cfg = replace(cfg, storage_path=storage.join(out_root, "checkpoints"))
    return cfg


def run_dir(cfg: TrainConfig, features_root: str) -> tuple[str, str]:
    """(storage_path URI, run folder URI) of a training run."""
    storage_path = storage.absolute(cfg.storage_path or storage.join(features_root, "checkpoints"))
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


# ----------------------------------------------------------------------------- export


def load_training_state(checkpoint_uri: str, fallback: bool = True) -> dict:
    """The training state saved in a checkpoint folder (local or ``s3://``); when it is
    corrupt, the previous readable checkpoint of the run, with a warning (``fallback=False``:
    raise :class:`CheckpointUnreadable` instead). See :func:`load_state_with_fallback`."""
    return load_state_with_fallback(checkpoint_uri)[0] if fallback else _read_state(checkpoint_uri)


models_dir = layout.models_dir


def export_encoder(objective: Objective, checkpoint_uri: str, root: str, tag: str, meta: dict | None = None) -> str:
    """Write the objective's encoder from a checkpoint to ``<root>/models/<tag>/encoder.pt``
    (+ ``config.json``); returns the encoder URI."""
    return export_encoders(objective, checkpoint_uri, root, [tag], [meta or {}])[0]


def export_encoders(objective: Objective, checkpoint_uri: str, root: str, tags: list[str],
                    metas: list[dict]) -> list[str]:
    """:func:`export_encoder` for the models an objective trains side by side: the checkpoint read
    and the module built once, member i (``objective.encoder(module, member=i)``) written to
    ``<root>/models/<tags[i]>`` with ``metas[i]``. One tag: the objective's one encoder."""
    state, checkpoint_uri, _ = load_state_with_fallback(checkpoint_uri)  # the one actually used
    module = objective.build()
    objective.setup(module, torch.device("cpu"))
    module.load_state_dict(state["module"])
    objective.load_state_dict(state.get("objective") or {})
    common = {
        **objective.describe(),
        "step": int(state["step"]),
        "checkpoint": checkpoint_uri,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    uris = []
    for i, (tag, meta) in enumerate(zip(tags, metas, strict=True)):
        encoder = objective.encoder(module) if len(tags) == 1 else objective.encoder(module, member=i)
        info = {**common, **meta}
        out = models_dir(root, tag)
        uris.append(save_checkpoint(encoder, storage.join(out, "encoder.pt"), meta=info))
        storage.atomic_write_json(storage.join(out, "config.json"), {"encoder": asdict(encoder.cfg), "meta": info})
    return uris


__all__ = [
    "CheckpointUnreadable",
    "FeatureBatches",
    "InjectedFault",
    "LoopResult",
    "Objective",
    "ObjectiveBase",
    "StageResult",
    "TrainConfig",
    "TrainResult",
    "clip_gradients",
    "crop_batch",
    "export_encoder",
    "export_encoders",
    "fbank_norm",
    "fit",
    "load_state_with_fallback",
    "load_training_state",
    "models_dir",
    "set_activation_checkpointing",
    "stage_train_config",
    "param_checksum",
    "table_batches",
    "train_loop",
    "train_plain",
]
