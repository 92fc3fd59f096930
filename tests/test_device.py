"""The ``device`` config group (one place for GPUs/CPUs), GPU scoring, and the training options a GPU
run uses (activation checkpointing, torch.compile), all checked on CPU."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from asd import resources
from asd.algorithms import knn

# Hydra and the jobs layer are imported inside the tests that use them: the GPU test below also runs
# on a bare GPU image that has Ray and pytest but no Hydra (benchmarks/gpu_check.sh).

def _stage_configs(monkeypatch, job: str, *overrides: str) -> list[tuple[str, object]]:
    """(stage, config) of every stage call a job's recipes make (the stage functions recorded, not run)."""
    import types

    import asd.stages.embed as E
    import asd.stages.finetune as F
    import asd.stages.pretrain as P
    import asd.stages.pseudo_label as L
    import asd.stages.score as S
    from asd.recipes.run import STEPS
    from jobs.common import compose_config, compose_recipes, recipe_run

    calls = []

    def encoders(root, tag, n=1):
        return [f"{root}/models/{tag}{'-m%d' % i if i else ''}/encoder.pt" for i in range(n)]

    monkeypatch.setattr(P, "pretrain", lambda f, root, pcfg, tcfg: calls.append(("train", tcfg)) or types.SimpleNamespace(
        encoder=encoders(root, pcfg.tag)[0], steps=1, start_step=0, final_loss=0.0, checkpoint=None))
    monkeypatch.setattr(F, "finetune", lambda f, root, fcfg, tcfg: calls.append(("train", tcfg)) or types.SimpleNamespace(
        encoders=encoders(root, fcfg.tag, fcfg.members), steps=1, start_step=0, num_classes=2, final_accuracy=1.0,
        seconds=0.0))
    monkeypatch.setattr(E, "embed", lambda root, tag, cfg: calls.append(("embed", cfg)) or types.SimpleNamespace(
        embeddings=f"{root}/embeddings/{tag}"))
    monkeypatch.setattr(L, "pseudo_label", lambda *a, **k: types.SimpleNamespace(quality={}, n_clips=0))
    monkeypatch.setattr(S, "score", lambda emb, out, cfg, **k: calls.append(("score", cfg)) or types.SimpleNamespace(
        scores=out))
    cfg = compose_config(job, list(overrides))
    names = [cfg.recipe.name, *cfg.get("compare", []), *cfg.get("recipes", [])]
    runner = recipe_run(cfg, stages=STEPS)
    for recipe in compose_recipes(cfg, dict.fromkeys(names)).values():
        runner.run(recipe)
    return calls


@pytest.mark.parametrize("job", ["pipeline", "evaluate"])
def test_device_cpu_changes_nothing_and_device_gpu_reaches_every_stage(job, monkeypatch):
    from asd.stages.embed import EmbedConfig
    from asd.stages.score import ScoreConfig

    cpu = _stage_configs(monkeypatch, job)
    assert [(s, c) for s, c in cpu if s == "embed"] and [(s, c) for s, c in cpu if s == "train"]
    for stage, c in cpu:  # each stage keeps its own (CPU) settings
        if stage == "train":
            assert not c.use_gpu and c.bf16 in (True, False)
        elif stage == "embed":
            assert c.num_gpus == EmbedConfig().num_gpus and c.num_cpus == EmbedConfig().num_cpus
        else:
            assert c.num_gpus == ScoreConfig().num_gpus
    gpu = _stage_configs(monkeypatch, job, "device=gpu", "device.train.num_workers=4")
    assert len(gpu) == len(cpu)
    for stage, c in gpu:
        if stage == "train":
            assert c.use_gpu and c.num_workers == 4 and c.gpus_per_worker == 1 and c.cpus_per_worker == 4 and c.bf16
        elif stage == "embed":  # log-mel statistics stay on CPUs
            assert c.num_gpus == (0.5 if c.embedder in ("encoder", "concat") else 0.0), c.embedder
        else:
            assert c.num_gpus == 0.25


def test_device_gpu_reaches_rescoring():
    from asd.stages.embed import EmbedConfig
    from jobs.common import compose_config, device_config

    dev = device_config(compose_config("rescore", ["device=gpu", "inbox=x"]))
    assert dev.for_embedding(EmbedConfig(embedder="encoder"), runs_a_model=True).num_gpus == 0.5
    assert dev.for_embedding(EmbedConfig(), runs_a_model=False).num_gpus == 0.0


def test_gpu_scoring_on_a_cpu_cluster_fails_fast(ray_session, monkeypatch):
    import ray.data

    from asd.stages.score import ScoreConfig, score_dataset

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
    from asd.stages.pretrain import Data2VecObjective, PretrainConfig
    from asd.training.batches import FeatureBatches, table_batches
    from asd.training.loop import TrainConfig, train_loop

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
    from asd.models.cnn import CNNEncoder
    from asd.training.loop import set_activation_checkpointing

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
    from asd.training.loop import TrainConfig

    with pytest.raises(ValueError, match="gpus_per_worker"):
        TrainConfig(use_gpu=True, gpus_per_worker=0)
    assert replace(TrainConfig(), use_gpu=True, gpus_per_worker=0.5).gpus_per_worker == 0.5


@pytest.mark.gpu
def test_gpu_embedding_and_scoring_through_ray(small_corpus, ray_session, tmp_path):
    """Embedding actors and scoring tasks that ask for a GPU run on it: bf16 embeddings close to the
    CPU's float32 ones but not equal (bf16 applies on CUDA only), the same kNN scores."""
    from asd.models.encoder import AudioEncoder
    from asd.models.registry import save_checkpoint
    from asd.stages.embed import EmbedConfig, embed
    from asd.stages.featurize import FeaturizeConfig, featurize
    from asd.stages.score import ScoreConfig, score
    from asd.stores.embeddings import read_embeddings, vectors

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
    from asd.io import storage

    x, y = (storage.read_table(storage.join(s.scores, "scores.parquet")).column("score").to_numpy()
            for s in (s_cpu, s_gpu))
    np.testing.assert_allclose(x, y, atol=1e-4)


def test_embedding_actors_resolve_auto_from_the_gpus_ray_gave_them():
    """Ray leaves CUDA_VISIBLE_DEVICES alone for an actor given no GPU; "auto" must not take the
    node's GPU then (found on an H200: CPU actors embedded on the GPU)."""
    from asd.stages.embed import actor_device_params

    params = {"fusion": "score", "device": "auto", "members": [
        {"embedder": "encoder", "params": {"checkpoint": "a.pt", "device": "auto"}},
        {"embedder": "encoder", "params": {"checkpoint": "b.pt", "device": "cpu"}}]}
    cpu, gpu = actor_device_params(params, gpu=False), actor_device_params(params, gpu=True)
    assert cpu["device"] == "cpu" and cpu["members"][0]["params"]["device"] == "cpu"
    assert gpu["device"] == "cuda" and gpu["members"][0]["params"]["device"] == "cuda"
    assert gpu["members"][1]["params"]["device"] == "cpu"  # an explicit device stays
    assert params["members"][0]["params"]["device"] == "auto"  # the config itself is not changed
