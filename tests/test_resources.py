"""Stages fail within seconds, naming the missing resource, when the cluster cannot place them."""

from __future__ import annotations

import time

import pytest

from asd import resources


def test_shortfall_names_the_resource_no_node_has():
    nodes = [{"CPU": 2.0, "memory": 1e9}]
    assert resources.shortfall({"CPU": 0.5}, 2, nodes) is None
    assert resources.shortfall({"CPU": 1.0, "GPU": 0.0}, 2, nodes) is None  # zero amounts ask nothing
    why = resources.shortfall({"CPU": 1.0, "GPU": 1}, 1, nodes)
    assert why is not None and "no node has 1 GPU" in why and "0 GPU in all" in why
    assert "no node has 4 CPU" in resources.shortfall({"CPU": 4}, 1, nodes)
    # each worker fits a node, but not all of them at once: two nodes of one GPU, three workers
    two = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert resources.shortfall({"CPU": 1, "GPU": 1}, 2, two) is None
    assert "3 workers" in resources.shortfall({"CPU": 1, "GPU": 1}, 3, two)


def test_wait_seconds_reads_the_environment(monkeypatch):
    monkeypatch.delenv(resources.WAIT_ENV, raising=False)
    assert resources.wait_seconds() == resources.DEFAULT_WAIT_S
    monkeypatch.setenv(resources.WAIT_ENV, "0")
    assert resources.wait_seconds() == 0.0
    monkeypatch.setenv(resources.WAIT_ENV, "soon")
    with pytest.raises(ValueError, match=resources.WAIT_ENV):
        resources.wait_seconds()


def test_training_that_asks_for_a_gpu_fails_fast_on_a_cpu_cluster(ray_session, monkeypatch, tmp_path):
    from asd.stages.pretrain import PretrainConfig, pretrain
    from asd.training.loop import TrainConfig

    monkeypatch.setenv(resources.WAIT_ENV, "1")
    (tmp_path / "features").mkdir()  # reachable, empty: the resource check comes before any data is read
    t0 = time.monotonic()
    with pytest.raises(resources.MissingResources, match=r"no node has 1 GPU.*use_gpu"):
        pretrain(str(tmp_path), str(tmp_path / "out"), PretrainConfig(model="tiny"),
                 TrainConfig(steps=2, num_workers=1, use_gpu=True, cpus_per_worker=0.5))
    assert time.monotonic() - t0 < 30


def test_embedding_that_asks_for_more_cpus_than_a_node_has_fails_fast(ray_session, monkeypatch, tmp_path):
    from asd.stages.embed import EmbedConfig, embed

    monkeypatch.setenv(resources.WAIT_ENV, "0")
    with pytest.raises(resources.MissingResources, match=r"embedding x cannot start: no node has 64 CPU"):
        embed(str(tmp_path), "x", EmbedConfig(num_actors=1, num_cpus=64, progress=False))
