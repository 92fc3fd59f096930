"""Small, guarded adjustments to Ray behaviour that the stages rely on.

Ray Data 2.60 reads the cluster's resources for a new execution from its
autoscaling coordinator actor, without blocking: the first read returns the
coordinator's cached answer, which is empty for a new execution, and the
executor keeps that answer for ``GLOBAL_LIMITS_UPDATE_INTERVAL_S`` (1 s). For
that first second it believes the cluster has no CPUs and runs one task at a
time, so every execution starts on one core (seen in ``ray.timeline()``: the
second worker's first task starts 1.0 s after the first's, on every run; see
``benchmarks/featurize.py`` and ``benchmarks/score.py``).

:func:`prompt_resource_limits` makes the executor ask again on its next
scheduling step while the limits it holds are all zero, instead of a second
later. Once real limits arrive the usual 1-s refresh applies unchanged. It is a
no-op (with a debug log) on a Ray whose internals differ.
"""

from __future__ import annotations

import functools
import logging
import time

log = logging.getLogger(__name__)

_PATCHED = "_asd_prompt_limits"
_RETRY_S = 0.05  # at most this often while the limits are still empty (a cluster scaling up from zero)


def prompt_resource_limits() -> bool:
    """Make Ray Data re-read empty resource limits at once; idempotent. True when active."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:  # pragma: no cover - another Ray layout
        log.debug("ray.data ResourceManager not found; resource limits left as Ray reads them")
        return False
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
