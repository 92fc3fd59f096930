"""The ``device`` config group (one place for GPUs/CPUs), GPU scoring, and the training options a GPU
run uses (activation checkpointing, torch.compile), all checked on CPU."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from asd import knn, resources

# Hydra and the jobs layer are imported inside the tests that use them: the GPU test below also runs
# on a bare GPU image that has Ray and pytest but no Hydra (benchmarks/gpu_check.sh).

CONF = os.path.join(os.path.dirname(__file__), "..", "jobs", "conf")
JOBS = ["pipeline", "evaluate", "pretrain", "finetune", "embed", "score", "rescore", "pseudo_label"]


def _compose(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _nodes(cfg):
    """(path, node) of every dict in a resolved config, the device group itself left out."""
    from omegaconf import OmegaConf

    out = []

    def walk(n, path):
        if isinstance(n, dict):
            out.append((path, n))
            for k, v in n.items():
                if path or k != "device":
                    walk(v, f"{path}.{k}" if path else k)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


@pytest.mark.parametrize("job", JOBS)
def test_device_cpu_changes_nothing_and_device_gpu_reaches_every_stage(job):
    from omegaconf import OmegaConf

    from jobs.common import apply_device

    cpu = _compose(job)
    before = copy.deepcopy(OmegaConf.to_container(cpu, resolve=True))
    assert OmegaConf.to_container(apply_device(cpu), resolve=True) == before

    gpu = apply_device(_compose(job, "device=gpu"))
    trains = [(p, n) for p, n in _nodes(gpu) if p.endswith("train") and "steps" in n]
    embeds = [(p, n) for p, n in _nodes(gpu) if "num_actors" in n and "num_gpus" in n]
    scores = [(p, n) for p, n in _nodes(gpu) if "threshold_method" in n]
    assert trains or embeds or scores, job
    for p, n in trains:
        assert n["use_gpu"] is True and n["gpus_per_worker"] == 1 and n["bf16"] is True, p
    for p, n in embeds:
        model_backed = n.get("embedder", "encoder") in ("encoder", "concat")
        assert n["num_gpus"] == (0.5 if model_backed else 0.0), p  # log-mel statistics stay on CPUs
    for p, n in scores:
        assert n["num_gpus"] == 0.25, p


def test_device_gpu_configs_build_the_stage_dataclasses():
    from omegaconf import OmegaConf

    from asd.embed import EmbedConfig
    from asd.pretrain import PretrainConfig
    from asd.rescore import RescoreConfig
    from asd.score import ScoreConfig
    from jobs.common import apply_device, stage_configs, to_dataclass

    cfg = apply_device(_compose("pipeline", "device=gpu", "device.train.num_workers=4"))
    pre, train = stage_configs(cfg.pretrain, PretrainConfig)
    assert train.use_gpu and train.num_workers == 4 and train.gpus_per_worker == 1 and train.cpus_per_worker == 4
    fused = {k: v for k, v in OmegaConf.to_container(cfg.embeds.fused, resolve=True).items() if k not in ("tag", "after")}
    assert to_dataclass(EmbedConfig, fused).num_gpus == 0.5
    assert to_dataclass(ScoreConfig, cfg.score).num_gpus == 0.25
    r = apply_device(_compose("rescore", "device=gpu", "inbox=x"))
    assert to_dataclass(RescoreConfig, r.embed).num_gpus == 0.5


def test_gpu_scoring_on_a_cpu_cluster_fails_fast(ray_session, monkeypatch):
    import ray.data

    from asd.score import ScoreConfig, score_dataset

    monkeypatch.setenv(resources.WAIT_ENV, "0")
    t0 = time.monotonic()
    with pytest.raises(resources.MissingResources, match=r"scoring cannot start: no node has 0.25 GPU"):
        score_dataset(ray.data.from_items([{"x": 1}]), {}, {}, ScoreConfig(num_gpus=0.25, progress=False))
    assert time.monotonic() - t0 < 30


def test_knn_torch_path_matches_numpy():
    """The accelerator path of the kNN search (run here on the CPU through torch) gives the numpy result."""
    rng = np.random.default_rng(0)
    bank, q = rng.standard_normal((50, 16)), rng.standard_normal((7, 16))
    for k in (1, 3):
        a = knn.knn_distance(q, bank, k=k, device="cpu")
        b = knn.knn_distance(q, bank, k=k, device="cpu:0", chunk_size=3)  # not "cpu": the torch path
        np.testing.assert_allclose(a, b, atol=1e-5)
    a = knn.knn_distance(bank, bank, k=2, exclude_self=True)
    b = knn.knn_distance(bank, bank, k=2, exclude_self=True, device="cpu:0", chunk_size=8)
    np.testing.assert_allclose(a, b, atol=1e-5)
    domains = ["source"] * 40 + ["target"] * 10
    fused = knn.FusedBank.build(bank, domains, [{"dim": 8, "weight": 1.0}, {"dim": 8, "weight": 0.5}])
    for x, y in zip(fused.score_parts(q), fused.score_parts(q, device="cpu:0")):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_a_banks_device_copy_is_made_once_and_dropped_with_the_bank():
    """Scoring many batches against one bank copies it to the device once; a new bank (the next
    run's) gets its own copy and the old one is released."""
    import gc

    rng = np.random.default_rng(1)
    bank = knn.MemoryBank.build(rng.standard_normal((30, 8)), ["source"] * 20 + ["target"] * 10)
    q = rng.standard_normal((4, 8))
    first = bank.score_parts(q, device="cpu:0")
    arrays = [b for b in vars(bank).values() if isinstance(b, np.ndarray) and b.ndim == 2]
    copies = {id(a): knn.device_copy(a, "cpu:0") for a in arrays}
    second = bank.score_parts(q, device="cpu:0")
    assert all(knn.device_copy(a, "cpu:0") is copies[id(a)] for a in arrays)  # reused, not copied again
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    n = len(knn._DEVICE_COPIES)
    del bank, arrays, copies
    gc.collect()
    knn.device_copy(np.zeros((2, 8), np.float32), "cpu:0")  # a new bank: the dead ones' copies go
    assert len(knn._DEVICE_COPIES) == 1 < n


def _pretrain_run(dropout: float = 0.1, **train_kw):
    from asd.batches import FeatureBatches, table_batches
    from asd.loop import TrainConfig, train_loop
    from asd.pretrain import Data2VecObjective, PretrainConfig

    rng = np.random.default_rng(0)
    frames, bins = 112, 128
    table = pa.table({
        "clip_id": [f"c{i}" for i in range(8)],
        "fbank": [(rng.standard_normal((frames, bins)) * 4 + 10).astype(np.float16).tobytes() for _ in range(8)],
        "fbank_dtype": ["float16"] * 8, "fbank_frames": [frames] * 8, "num_mel_bins": [bins] * 8,
    })
    cfg = TrainConfig(steps=3, batch_size=4, crop_frames=96, warmup_steps=1, log_every=1, checkpoint_every=10**6,
                      **train_kw)
    obj = Data2VecObjective(PretrainConfig(model="tiny", clone_batch=2, decoder_dim=32, decoder_layers=1,
                                           top_k_layers=2, encoder={"dropout": dropout, "attention_dropout": dropout}))
    return train_loop(obj, FeatureBatches(table_batches(table, cfg), cfg, cache=True), cfg, device="cpu")


def test_activation_checkpointing_gives_the_same_training():
    """Recomputing the blocks in backward (dropout on: its random draws must repeat) changes nothing."""
    plain, ckpt = _pretrain_run(), _pretrain_run(activation_checkpointing=True)
    assert [h["loss"] for h in plain.history] == pytest.approx([h["loss"] for h in ckpt.history], rel=1e-5)
    for a, b in zip(plain.module.state_dict().values(), ckpt.module.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_activation_checkpointing_needs_a_transformer():
    from asd.loop import set_activation_checkpointing
    from asd.models.cnn import CNNEncoder

    with pytest.raises(ValueError, match="needs a transformer encoder"):
        set_activation_checkpointing(CNNEncoder(), True)


@pytest.mark.slow
def test_compiled_training_matches_eager():
    """``compile=True`` (inductor on the CPU here): the same losses within float tolerance, and the
    exported state keeps the eager module's keys. Without dropout: compiled dropout draws other numbers."""
    eager, compiled = _pretrain_run(dropout=0.0), _pretrain_run(dropout=0.0, compile=True)
    assert [h["loss"] for h in eager.history] == pytest.approx([h["loss"] for h in compiled.history], rel=1e-3)
    assert list(eager.module.state_dict()) == list(compiled.module.state_dict())


def test_train_config_checks_gpus_per_worker():
    from asd.loop import TrainConfig

    with pytest.raises(ValueError, match="gpus_per_worker"):
        TrainConfig(use_gpu=True, gpus_per_worker=0)
    assert replace(TrainConfig(), use_gpu=True, gpus_per_worker=0.5).gpus_per_worker == 0.5


@pytest.mark.gpu
def test_gpu_embedding_and_scoring_through_ray(small_corpus, ray_session, tmp_path):
    """Embedding actors and scoring tasks that ask for a GPU run on it: bf16 embeddings close to the
    CPU's float32 ones but not equal (bf16 applies on CUDA only), the same kNN scores."""
    from asd.embed import EmbedConfig, embed
    from asd.embeddings import read_embeddings, vectors
    from asd.featurize import FeaturizeConfig, featurize
    from asd.models.encoder import AudioEncoder, save_checkpoint
    from asd.score import ScoreConfig, score

    root = str(tmp_path / "root")
    featurize(small_corpus, root, FeaturizeConfig(progress=False))
    torch.manual_seed(0)
    ckpt = save_checkpoint(AudioEncoder("tiny"), str(tmp_path / "encoder.pt"))
    params = {"checkpoint": ckpt, "device": "auto", "max_frames": 512, "bf16": True}
    runs = {}
    for tag, gpus in (("cpu", 0.0), ("gpu", 0.5)):
        res = embed(root, tag, EmbedConfig(embedder="encoder", params=params, num_actors=1, num_cpus=1,
                                           num_gpus=gpus, progress=False))
        runs[tag] = res.embeddings
    a, b = (vectors(read_embeddings(runs[t])) for t in ("cpu", "gpu"))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.abs(a - b).max() > 0 and cos.min() > 0.99
    s_cpu = score(runs["gpu"], str(tmp_path / "s_cpu"), ScoreConfig(progress=False, plots=False))
    s_gpu = score(runs["gpu"], str(tmp_path / "s_gpu"), ScoreConfig(progress=False, plots=False, num_gpus=0.25))
    from asd import storage

    x, y = (storage.read_table(storage.join(s.scores, "scores.parquet")).column("score").to_numpy()
            for s in (s_cpu, s_gpu))
    np.testing.assert_allclose(x, y, atol=1e-4)


def test_embedding_actors_resolve_auto_from_the_gpus_ray_gave_them():
    """Ray leaves CUDA_VISIBLE_DEVICES alone for an actor given no GPU; "auto" must not take the
    node's GPU then (found on an H200: CPU actors embedded on the GPU)."""
    from asd.embed import actor_device_params

    params = {"fusion": "score", "device": "auto", "members": [
        {"embedder": "encoder", "params": {"checkpoint": "a.pt", "device": "auto"}},
        {"embedder": "encoder", "params": {"checkpoint": "b.pt", "device": "cpu"}}]}
    cpu, gpu = actor_device_params(params, gpu=False), actor_device_params(params, gpu=True)
    assert cpu["device"] == "cpu" and cpu["members"][0]["params"]["device"] == "cpu"
    assert gpu["device"] == "cuda" and gpu["members"][0]["params"]["device"] == "cuda"
    assert gpu["members"][1]["params"]["device"] == "cpu"  # an explicit device stays
    assert params["members"][0]["params"]["device"] == "auto"  # the config itself is not changed
