"""The training loop every training stage runs on each worker, with or without Ray.

:class:`TrainConfig` holds the optimisation, data and worker settings of every stage; an
*objective* (:class:`Objective`: self-supervised pre-training in :mod:`asd.stages.pretrain`, attribute
classification in :mod:`asd.stages.finetune`, the autoencoder baseline in
:mod:`asd.baselines.autoencoder`) says what is trained. :func:`train_loop` does the rest on one
worker: AdamW (no decay on norms and biases), linear warm-up + cosine LR, gradient accumulation
(``no_sync`` on the micro-steps before the last), per-group gradient clipping, bf16 autocast and
TF32 on CUDA, optional activation checkpointing and ``torch.compile``, the objective's hook after
every optimizer step (an EMA teacher), periodic checkpoints through a callback, and a step count
that continues on resume. Logged values stay on the device until a log step. Plain
``torch.distributed`` + DDP can drive it (``asd.training.fit.train_plain``); Ray Train does in
:func:`asd.training.fit.fit`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch
import torch.nn as nn

from asd.models.encoder import AudioEncoder

log = logging.getLogger(__name__)


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
    input: str  # the feature matrix it trains on (asd.stores.features.MATRICES), batched as batch["fbank"]
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


# ----------------------------------------------------------------------------- loop


class BatchSource(Protocol):
    """Where the loop's batches come from (:class:`asd.training.batches.FeatureBatches`): the batches of one
    epoch, ``{"fbank": (B, ...) tensor, <column>: list}``, the first ``skip`` left out (resume)."""

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]: ...



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


@torch.no_grad()
def ema_update(average: nn.Module, live: nn.Module, decay: float, buffers: bool = False) -> None:
    """``average = decay * average + (1 - decay) * live``, parameter by parameter (two modules of
    the same structure); with ``buffers`` the floating-point buffers (BatchNorm running statistics)
    are averaged the same way and the others (BatchNorm's batch counter) copied."""
    avg = list(average.parameters())
    torch._foreach_mul_(avg, decay)
    torch._foreach_add_(avg, [p.detach().to(a.dtype) for p, a in zip(live.parameters(), avg)], alpha=1.0 - decay)
    if buffers:
        for a, b in zip(average.buffers(), live.buffers()):
            if a.is_floating_point():
                a.mul_(decay).add_(b.detach().to(a.dtype), alpha=1.0 - decay)
            else:
                a.copy_(b)


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
    source: BatchSource,
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


def cuda_precision(cfg: TrainConfig) -> None:
    """TF32 for the float32 matmuls left outside bf16 autocast (``cfg.tf32``; cuDNN convolutions
    use TF32 by PyTorch's default already)."""
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
