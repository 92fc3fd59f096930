"""asd.raycompat: Ray Data re-reads resource limits at once while it knows none."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from asd import raycompat

execution_options = pytest.importorskip("ray.data._internal.execution.interfaces.execution_options")
resource_manager = pytest.importorskip("ray.data._internal.execution.resource_manager")
ExecutionOptions = execution_options.ExecutionOptions
ExecutionResources = execution_options.ExecutionResources
ResourceManager = resource_manager.ResourceManager


def _manager(cluster: ExecutionResources, held: ExecutionResources, read_at: float):
    """The state ResourceManager.get_global_limits reads, as a new execution has it after its
    first (empty) answer from the autoscaling coordinator."""
    calls = []

    def total():
        calls.append(time.time())
        return cluster

    return SimpleNamespace(_global_limits=held, _global_limits_last_update_time=read_at,
                           _options=ExecutionOptions(), _get_total_resources=total,
                           _object_store_memory_limit_fraction=0.5,
                           GLOBAL_LIMITS_UPDATE_INTERVAL_S=ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S), calls


def test_without_the_adjustment_ray_keeps_empty_limits_for_a_second():
    # the behaviour the adjustment exists for: if this fails, Ray changed and the shim can go
    original = getattr(ResourceManager.get_global_limits, "__wrapped__", ResourceManager.get_global_limits)
    mgr, calls = _manager(ExecutionResources(cpu=2, object_store_memory=2**30), ExecutionResources.zero(),
                          read_at=time.time())
    assert original(mgr).cpu == 0
    assert calls == []


def test_empty_limits_are_read_again_at_once():
    assert raycompat.prompt_resource_limits()
    assert raycompat.prompt_resource_limits()  # idempotent: wraps once
    assert not hasattr(ResourceManager.get_global_limits.__wrapped__, "__wrapped__")
    cluster = ExecutionResources(cpu=2, object_store_memory=2**30)
    mgr, calls = _manager(cluster, ExecutionResources.zero(), read_at=time.time() - 0.2)
    assert ResourceManager.get_global_limits(mgr).cpu == 2
    assert len(calls) == 1


def test_known_limits_keep_rays_refresh_interval():
    raycompat.prompt_resource_limits()
    held = ExecutionResources(cpu=2, object_store_memory=2**30)
    mgr, calls = _manager(ExecutionResources(cpu=8, object_store_memory=2**30), held, read_at=time.time())
    assert ResourceManager.get_global_limits(mgr).cpu == 2  # not re-read before Ray's interval
    assert calls == []


def test_empty_limits_are_not_polled_on_every_step():
    # a cluster that really has no CPU yet (scaling up from zero): ask at most every _RETRY_S
    raycompat.prompt_resource_limits()
    mgr, calls = _manager(ExecutionResources.zero(), ExecutionResources.zero(), read_at=time.time())
    assert ResourceManager.get_global_limits(mgr).cpu == 0
    assert calls == []
