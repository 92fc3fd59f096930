"""Small, guarded adjustments to Ray Data behaviour that the stages rely on.

The stages call :func:`prepare_data_execution` before they run a Ray Data
dataset; it applies the three adjustments below, each idempotent, each a no-op
(with a debug log) on a Ray whose internals differ.

**Empty resource limits at start.** Ray Data 2.60 reads the cluster's resources for a new execution from its
autoscaling coordinator actor, without blocking: the first read returns the
coordinator's cached answer, which is empty for a new execution, and the
executor keeps that answer for ``GLOBAL_LIMITS_UPDATE_INTERVAL_S`` (1 s). For
that first second it believes the cluster has no CPUs and runs one task at a
time, so every execution starts on one core (seen in ``ray.timeline()``: the
second worker's first task starts 1.0 s after the first's, on every run; see
``benchmarks/featurize.py`` and ``benchmarks/score.py``).

:func:`prompt_resource_limits` makes the executor ask again on its next
scheduling step while the limits it holds are all zero, instead of a second
later. Once real limits arrive the usual 1-s refresh applies unchanged.

**Task completions noticed a step late.** By default Ray Data 2.60 fetches the
metadata of a task's output blocks on a background thread and postpones the
task's completion (which frees its CPUs for the next task) until that fetch
has come back, which the scheduling loop sees on a later step: every step waits
up to 0.1 s in ``ray.wait``. Our tasks are coarse (hundreds of clips, a few
output blocks), so each finished task left its core idle for 0.18 s (median,
``benchmarks/featurize.py`` with 64-clip tasks) before the next one started.
:func:`inline_block_metadata` selects Ray's own inline mode (the one
``RAY_DATA_METADATA_PREFETCH_ON_THREAD=0`` selects), which fetches the few
metadata objects on the scheduling thread and frees the task's resources in the
same step: 0.06 s. A user who sets that variable keeps their choice.

**A finished task noticed only at the end of a 0.1-s wait.** Each scheduling
step of Ray Data 2.60 calls ``ray.wait(active_tasks, num_returns=len(active_tasks),
timeout=0.1)``: unless every running task is ready, it sleeps the whole 0.1 s,
so a core whose task has just finished waits 0.05 s on average (up to 0.1 s)
before the next task is even submitted. :func:`prompt_task_completion` gives
that module a ``ray.wait`` that returns as soon as one task is ready, then
collects every other ready one without waiting: the same ready set, sooner.
The executor still steps at least every 0.1 s; it steps more often only when
tasks really finish, so the driver's CPU does not grow with it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import time

log = logging.getLogger(__name__)

_PATCHED = "_asd_prompt_limits"
_RETRY_S = 0.05  # at most this often while the limits are still empty (a cluster scaling up from zero)
METADATA_ON_THREAD_ENV = "RAY_DATA_METADATA_PREFETCH_ON_THREAD"


def prepare_data_execution() -> None:
    """Apply every adjustment of this module (call before running a Ray Data dataset)."""
    prompt_resource_limits()
    inline_block_metadata()
    prompt_task_completion()


def _ray_internal(module: str, unchanged: str, *names: str):
    """Ray's internal ``module`` when it has every attribute in ``names``; else None, with a debug
    log saying what is left as Ray does it (``unchanged``) on a Ray laid out differently."""
    try:
        mod = importlib.import_module(module)
    except ImportError:  # pragma: no cover - another Ray layout
        mod = None
    if mod is None or not all(hasattr(mod, n) for n in names):
        log.debug("%s%s not found; %s", module, f" (with {', '.join(names)})" if names else "", unchanged)
        return None
    return mod


def inline_block_metadata() -> bool:
    """Have Ray Data fetch output-block metadata inline, unless the user chose a mode with
    ``RAY_DATA_METADATA_PREFETCH_ON_THREAD``. True when inline mode is in effect."""
    metadata_fetcher = _ray_internal("ray.data._internal.execution.metadata_fetcher", "block metadata fetched as Ray does",
                                     "_PREFETCH_ON_THREAD", "InlineMetadataFetcher")
    if metadata_fetcher is None:
        return False
    if METADATA_ON_THREAD_ENV not in os.environ:
        metadata_fetcher._PREFETCH_ON_THREAD = False  # read by make_metadata_fetcher() per execution
    return not metadata_fetcher._PREFETCH_ON_THREAD


def prompt_resource_limits() -> bool:
    """Make Ray Data re-read empty resource limits at once; idempotent. True when active."""
    manager = _ray_internal("ray.data._internal.execution.resource_manager", "resource limits left as Ray reads them",
                            "ResourceManager")
    if manager is None:
        return False
    ResourceManager = manager.ResourceManager
    original = getattr(ResourceManager, "get_global_limits", None)
    if original is None or not hasattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S"):
        log.debug("ResourceManager.get_global_limits not found; resource limits left as Ray reads them")
        return False
    if getattr(original, _PATCHED, False):
        return True

    @functools.wraps(original)
    def get_global_limits(self):
        limits = getattr(self, "_global_limits", None)
        if (limits is not None and limits.cpu == 0 and limits.gpu == 0
                and time.time() - self._global_limits_last_update_time >= _RETRY_S):
            # nothing known yet (the coordinator had not answered): ask again now
            self._global_limits_last_update_time = 0
        return original(self)

    setattr(get_global_limits, _PATCHED, True)
    ResourceManager.get_global_limits = get_global_limits
    return True


class _PromptWait:
    """The ``ray`` module as Ray Data's scheduling step sees it, but with a ``wait`` that
    returns as soon as one of several refs is ready (then takes every ready one)."""

    def __init__(self, ray_module):
        self._ray = ray_module

    def __getattr__(self, name):
        return getattr(self._ray, name)

    def wait(self, refs, *, num_returns=1, timeout=None, fetch_local=True):
        refs = list(refs)
        if num_returns <= 1 or len(refs) <= 1 or not timeout:
            return self._ray.wait(refs, num_returns=num_returns, timeout=timeout, fetch_local=fetch_local)
        first, _ = self._ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=fetch_local)
        if not first:
            return [], refs
        return self._ray.wait(refs, num_returns=num_returns, timeout=0, fetch_local=fetch_local)


def prompt_task_completion() -> bool:
    """Have Ray Data's scheduling step notice a finished task at once; idempotent. True when active."""
    state = _ray_internal("ray.data._internal.execution.streaming_executor_state", "task completions noticed as Ray does",
                          "ray", "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S")
    if state is None:
        return False
    if isinstance(state.ray, _PromptWait):
        return True
    import ray

    if state.ray is not ray:
        log.debug("ray.data scheduling step not as expected; task completions noticed as Ray does")
        return False
    state.ray = _PromptWait(ray)
    return True
