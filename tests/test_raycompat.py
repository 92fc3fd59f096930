"""asd.raycompat: Ray Data re-reads resource limits at once while it knows none, frees a finished
task's resources in the step that sees it finish (block metadata fetched inline), and its scheduling
step wakes when one task finishes rather than after its whole 0.1-s wait."""

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


metadata_fetcher = pytest.importorskip("ray.data._internal.execution.metadata_fetcher")


def test_rays_default_fetches_block_metadata_on_a_thread(monkeypatch):
    # the behaviour inline_block_metadata exists for: if this fails, Ray changed and the shim can go
    monkeypatch.setattr(metadata_fetcher, "_PREFETCH_ON_THREAD", True)
    assert isinstance(metadata_fetcher.make_metadata_fetcher(), metadata_fetcher.ThreadedMetadataFetcher)


def test_block_metadata_is_fetched_inline(monkeypatch):
    monkeypatch.delenv(raycompat.METADATA_ON_THREAD_ENV, raising=False)
    monkeypatch.setattr(metadata_fetcher, "_PREFETCH_ON_THREAD", True)
    assert raycompat.inline_block_metadata()
    assert raycompat.inline_block_metadata()  # idempotent
    assert isinstance(metadata_fetcher.make_metadata_fetcher(), metadata_fetcher.InlineMetadataFetcher)


def test_a_users_metadata_mode_is_kept(monkeypatch):
    monkeypatch.setenv(raycompat.METADATA_ON_THREAD_ENV, "1")
    monkeypatch.setattr(metadata_fetcher, "_PREFETCH_ON_THREAD", True)
    assert not raycompat.inline_block_metadata()
    assert isinstance(metadata_fetcher.make_metadata_fetcher(), metadata_fetcher.ThreadedMetadataFetcher)


def test_prepare_data_execution_applies_all(monkeypatch):
    monkeypatch.delenv(raycompat.METADATA_ON_THREAD_ENV, raising=False)
    monkeypatch.setattr(metadata_fetcher, "_PREFETCH_ON_THREAD", True)
    raycompat.prepare_data_execution()
    assert metadata_fetcher._PREFETCH_ON_THREAD is False
    assert getattr(ResourceManager.get_global_limits, "_asd_prompt_limits", False)
    assert isinstance(executor_state.ray, raycompat._PromptWait)


executor_state = pytest.importorskip("ray.data._internal.execution.streaming_executor_state")


def test_rays_scheduling_step_waits_for_every_running_task():
    # the behaviour prompt_task_completion exists for: if this fails, Ray changed and the shim can go
    import inspect

    src = inspect.getsource(executor_state.process_completed_tasks)
    assert "num_returns=len(active_tasks)" in src and "timeout=WAIT_FOR_TASK_COMPLETION_TIMEOUT_S" in src


def test_the_scheduling_step_wakes_when_one_task_is_done(ray_session):
    import ray

    assert raycompat.prompt_task_completion()
    assert raycompat.prompt_task_completion()  # idempotent: wraps once
    shim = executor_state.ray
    assert isinstance(shim, raycompat._PromptWait) and shim._ray is ray
    assert shim.ObjectRef is ray.ObjectRef  # everything else is Ray's own

    @ray.remote(num_cpus=0)
    def after(seconds):
        time.sleep(seconds)
        return seconds

    fast, slow = after.remote(0), after.remote(60)
    ray.get(fast)
    t0 = time.perf_counter()
    ready, rest = shim.wait([fast, slow], num_returns=2, timeout=30, fetch_local=False)
    assert time.perf_counter() - t0 < 10  # Ray's own wait would sleep the whole 30 s here
    assert ready == [fast] and rest == [slow]
    ready, rest = shim.wait([slow], num_returns=1, timeout=0.05, fetch_local=False)  # one ref: Ray's wait
    assert ready == [] and rest == [slow]
    fast2 = after.remote(0)
    ray.get(fast2)
    ready, rest = shim.wait([slow, fast2], num_returns=2, timeout=0.05, fetch_local=False)
    assert ready == [fast2] and rest == [slow]
    slow2 = after.remote(60)
    ready, rest = shim.wait([slow, slow2], num_returns=2, timeout=0.05, fetch_local=False)  # none ready in time
    assert ready == [] and rest == [slow, slow2]
    for ref in (slow, slow2):
        ray.cancel(ref, force=True)


def test_another_ray_layout_leaves_ray_as_it_is():
    # each adjustment looks its Ray internals up first; missing ones mean "do nothing", never an error
    assert raycompat._ray_internal("ray.data._internal.no_such_module", "left alone") is None
    assert raycompat._ray_internal(executor_state.__name__, "left alone", "no_such_name") is None
    assert raycompat._ray_internal(executor_state.__name__, "left alone", "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S") is executor_state
