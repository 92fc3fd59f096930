"""Fault injection for tests (``TrainConfig.fail_at_step``): one worker fails at a given step, once.

Test support, not a production setting: the shipped configs do not name these knobs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from asd.io import storage
from asd.training.checkpoints import checkpoint_key
from asd.training.loop import TrainConfig

log = logging.getLogger(__name__)



class InjectedFault(RuntimeError):
    """Raised by ``fail_at_step`` fault injection."""


def fault_hook(cfg: TrainConfig, run_uri: str, rank: int, world_size: int) -> Callable[[int], None] | None:
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
        key = checkpoint_key(os.path.basename(ckpt.path.rstrip("/"))) if ckpt is not None else None
        if key is not None and key[0] >= step:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
