"""Pre-training: the SSL objective, the shared train loop (plain and on Ray Train: DDP, a
killed worker, S3 checkpoints), init checkpoints, export and the ``encoder`` embedder."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from asd.io import storage
from asd.models.encoder import AudioEncoder, beats_config_from, get_config
from asd.models.registry import load_checkpoint, save_checkpoint
from asd.stages.featurize import FeaturizeConfig, featurize
from asd.stages.pretrain import (
    Data2VecObjective,
    PretrainConfig,
    make_mask,
    pretrain,
    resolve_encoder_config,
    teacher_targets,
)
from asd.stores.features import read_features_table
from asd.training.batches import FeatureBatches, table_batches
from asd.training.checkpoints import export_encoder, load_training_state
from asd.training.fit import fit
from asd.training.loop import TrainConfig, param_checksum, train_loop

TINY = dict(model="tiny", clone_batch=2, decoder_dim=64, decoder_layers=1, top_k_layers=2,
            ema_start=0.99, ema_end=0.999)


def _tcfg(**kw) -> TrainConfig:
    base = dict(steps=10, batch_size=8, lr=1e-3, warmup_steps=2, crop_frames=192, log_every=1,
                checkpoint_every=4, num_workers=2, resume=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def feat_root(small_corpus, ray_session, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pretrain_root"))
    featurize(small_corpus, root, FeaturizeConfig(progress=False))
    return root


@pytest.fixture(scope="module")
def train_table(feat_root):
    t = read_features_table(feat_root)
    return t.filter(pc.field("split") == "train")


def _source(table, cfg, rank=0, world_size=1):
    return FeatureBatches(table_batches(table, cfg, rank, world_size), cfg, rank=rank, cache=True)


# ----------------------------------------------------------------------------- objective parts


def test_masks_drop_the_same_count_and_blocks_cluster():
    torch.manual_seed(0)
    grid = (12, 8)
    for kind in ("random", "block"):
        m = make_mask(64, grid, 0.8, kind, 3, "cpu")
        assert m.shape == (64, 96) and m.dtype == torch.bool
        assert set(m.sum(1).tolist()) == {96 - round(96 * 0.2)}

    def kept_neighbours(m):  # kept patches whose right or lower neighbour is kept too
        k = ~m.view(-1, *grid)
        return int((k[:, 1:] & k[:, :-1]).sum() + (k[:, :, 1:] & k[:, :, :-1]).sum())

    assert kept_neighbours(make_mask(256, grid, 0.8, "block", 3, "cpu")) > 1.5 * kept_neighbours(
        make_mask(256, grid, 0.8, "random", 3, "cpu"))


def test_teacher_targets_are_instance_then_layer_normalised():
    layers = [torch.randn(3, 20, 16) * (i + 1) + i for i in range(4)]
    y = teacher_targets(layers, 2, layer_norm=False)
    assert torch.allclose(y.mean(1), torch.zeros(3, 16), atol=1e-5)  # instance norm: zero mean per channel
    y = teacher_targets(layers, 2)
    assert torch.allclose(y.mean(-1), torch.zeros(3, 20), atol=1e-5)
    assert y.mean(1).abs().sum() > 0.1  # the utterance target (mean over patches) is not trivially zero


def test_loss_decreases_and_teacher_follows_without_ray(train_table):
    torch.set_num_threads(2)
    cfg = _tcfg(steps=30, batch_size=8, warmup_steps=5, log_every=5, checkpoint_every=1000)
    obj = Data2VecObjective(PretrainConfig(**{**TINY, "clone_batch": 4, "decoder_dim": 128, "decoder_layers": 2}))
    res = train_loop(obj, _source(train_table, cfg), cfg, device="cpu")
    losses = [h["loss"] for h in res.history]
    assert res.step == 30 and res.start_step == 0 and len(losses) == 6
    assert np.mean(losses[-2:]) < 0.75 * losses[0], losses
    assert all(np.isfinite(losses))
    # the EMA teacher moved away from the initial weights, towards (not onto) the student
    torch.manual_seed(cfg.seed)
    init = obj.build().encoder.state_dict()
    student, teacher = res.module.encoder.state_dict(), obj.teacher.state_dict()
    k = "encoder.layers.0.fc1.weight"
    assert not torch.equal(teacher[k], init[k]) and not torch.equal(teacher[k], student[k])
    assert (teacher[k] - student[k]).norm() < (init[k] - student[k]).norm()


def test_resume_inside_an_epoch_is_exact_without_ray(train_table):
    cfg = _tcfg(steps=9, batch_size=16, checkpoint_every=5, log_every=1)  # 30 clips/rank: 2 batches/epoch
    saved = {}

    def keep(state, metrics):
        if metrics["step"] == 5:
            saved["state"] = state

    full = train_loop(Data2VecObjective(PretrainConfig(**TINY)), _source(train_table, cfg, 0, 2), cfg,
                      device="cpu", on_checkpoint=keep)
    state = saved["state"]
    assert state["step"] == 5 and state["epoch"] == 2 and state["batch_in_epoch"] == 1
    resumed = train_loop(Data2VecObjective(PretrainConfig(**TINY)), _source(train_table, cfg, 0, 2), cfg,
                         device="cpu", resume_state=state)
    assert resumed.start_step == 5 and resumed.step == 9
    assert [h["step"] for h in resumed.history] == list(range(1, 10))
    assert resumed.param_checksum == full.param_checksum  # same weights as the uninterrupted run


def test_init_checkpoint_in_beats_format_sets_architecture_and_weights(tmp_path):
    torch.manual_seed(123)
    enc = AudioEncoder("tiny")
    path = str(tmp_path / "beats_like.pt")
    torch.save({"cfg": beats_config_from(enc.cfg), "model": enc.state_dict()}, path)  # BEATs release layout
    pcfg = PretrainConfig(model="base", init_checkpoint=path, encoder={"dropout": 0.0})
    cfg = resolve_encoder_config(pcfg)
    assert cfg.encoder_embed_dim == 128 and cfg.encoder_layers == 2  # from the file, not "base"
    obj = Data2VecObjective(pcfg)
    module = obj.build()
    obj.initialize(module)
    assert param_checksum(module.encoder) == param_checksum(enc)


def test_encoder_embedder_windows_tiles_and_normalises(tmp_path):
    from asd.models.embedders import EncoderEmbedder, windows

    assert windows(100, 64) == [(0, 64), (36, 100)]
    assert windows(128, 64) == [(0, 64), (64, 128)]
    assert windows(10, 64) == [(0, 10)]
    torch.manual_seed(0)
    enc = AudioEncoder("tiny")
    path = str(tmp_path / "enc.pt")
    save_checkpoint(enc, path, meta={"norm_mean": 1.0, "norm_std": 3.0})
    emb = EncoderEmbedder(path, max_frames=64, device="cpu")
    rng = np.random.default_rng(0)
    clips = [rng.normal(5, 3, size=(n, 128)).astype(np.float32) for n in (100, 64, 10, 64)]
    out = emb(clips)
    assert out.shape == (4, 128) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():  # one window: the model's own mean pooling on (x - 1) / (2 * 3)
        ref = enc.embed(torch.from_numpy((clips[1] - 1.0) / 6.0)[None]).numpy()[0]
        two = [enc.embed(torch.from_numpy((clips[0][s:e] - 1.0) / 6.0)[None]).numpy()[0] for s, e in windows(100, 64)]
    assert np.allclose(out[1], ref / np.linalg.norm(ref), atol=1e-5)
    avg = np.mean(two, axis=0)
    assert np.allclose(out[0], avg / np.linalg.norm(avg), atol=1e-5)
    assert np.allclose(emb([clips[3]])[0], out[3], atol=1e-6)  # batch composition does not matter


# ----------------------------------------------------------------------------- Ray Train


@pytest.mark.slow
def test_ddp_two_workers_killed_worker_resumes(feat_root, tmp_path):
    """2 DDP workers; rank 1's process dies at step 6; the group restarts from the step-4
    checkpoint and finishes: the step count continues, the weights stay identical."""
    cfg = _tcfg(steps=10, checkpoint_every=4, num_to_keep=2, fail_at_step=6, fail_mode="exit",
                storage_path=str(tmp_path / "ckpt"), name="ddp")
    obj = Data2VecObjective(PretrainConfig(**TINY))
    res = fit(obj, feat_root, cfg)
    assert res.step == 10
    assert res.start_step == 4  # the last attempt started at the checkpointed step, not 0
    assert [h["step"] for h in res.history] == list(range(1, 11))  # history from before the kill kept
    assert len(res.workers) == 2 and res.workers[0]["param_checksum"] == res.workers[1]["param_checksum"]
    assert all(w["start_step"] == 4 for w in res.workers)
    assert storage.exists(storage.join(res.run, "_faults", "step-00000006.json"))
    kept = sorted(p for p in os.listdir(res.run) if p.startswith("step-"))
    assert kept == ["step-00000008", "step-00000010"]  # num_to_keep
    state = load_training_state(res.checkpoint)
    assert state["step"] == 10 and state["world_size"] == 2 and "teacher" in state["objective"]
    uri = export_encoder(obj, res.checkpoint, str(tmp_path / "out"), "pretrain", meta={"norm_mean": 15.0})
    enc = load_checkpoint(uri)
    assert enc.meta["step"] == 10 and enc.meta["objective"] == "data2vec2" and enc.cfg == get_config("tiny")
    assert param_checksum(enc)[:8]  # loads strictly


@pytest.mark.slow
@pytest.mark.s3
def test_pretrain_on_s3_resumes_from_s3_starts_from_init_and_embeds(feat_root, s3_bucket, tmp_path):
    """Checkpoints and models on moto S3; a failure at step 3 restarts from the step-2
    checkpoint read back from S3; the student starts from a BEATs-format init checkpoint
    (tiny lr, so the export must still equal it); the export feeds asd.stages.embed.embed."""
    import asd.models.embedders  # noqa: F401  (registers "encoder")
    from asd.stages.embed import EmbedConfig, embed
    from asd.stores.embeddings import read_embeddings, vectors

    torch.manual_seed(321)
    init = AudioEncoder("tiny")
    init_uri = f"{s3_bucket}/init/beats_tiny.pt"
    import io

    buf = io.BytesIO()
    torch.save({"cfg": beats_config_from(init.cfg), "model": init.state_dict()}, buf)
    storage.atomic_write_bytes(init_uri, buf.getvalue())

    out = f"{s3_bucket}/run"
    pcfg = PretrainConfig(**{**TINY, "model": "base", "init_checkpoint": init_uri})
    tcfg = _tcfg(steps=4, checkpoint_every=2, num_workers=1, lr=1e-9, weight_decay=0.0, fail_at_step=3)
    res = pretrain(feat_root, out, pcfg, tcfg)
    assert res.steps == 4 and res.start_step == 2  # resumed from the S3 checkpoint
    assert res.run == f"{out}/checkpoints/pretrain" and res.checkpoint == f"{out}/checkpoints/pretrain/step-00000004"
    assert res.encoder == f"{out}/models/pretrain/encoder.pt"
    assert not storage.exists(f"{out}/models/CURRENT")  # the pipeline names the serving model, not a stage
    assert load_training_state(res.checkpoint)["step"] == 4
    enc = load_checkpoint(res.encoder)
    assert enc.cfg.encoder_embed_dim == 128  # the init file's architecture, not "base"
    for k, v in init.state_dict().items():
        assert torch.allclose(enc.state_dict()[k], v, atol=1e-5), k
    assert enc.meta["norm_mean"] == pytest.approx(15.41663)

    e = embed(feat_root, "pretrained", EmbedConfig(embedder="encoder", params={"checkpoint": res.encoder},
                                                    num_actors=1, progress=False))
    table = read_embeddings(e.embeddings)
    assert e.n_clips == table.num_rows == read_features_table(feat_root, columns=["clip_id"]).num_rows
    v = vectors(table)
    assert v.shape == (e.n_clips, 128) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_pretrain_job_pretrains_the_recipes_encoder(feat_root, tmp_path):
    """jobs.pretrain composes the recipe (recipe=pretrained: pretrain=tiny) and runs in-process; the
    recipe's embedding points at its export."""
    from asd.recipes.recipe import members
    from jobs import pretrain as pretrain_job
    from jobs.common import compose_config, recipe_from_config

    root = str(tmp_path / "jobroot")
    os.makedirs(root)
    os.symlink(os.path.join(feat_root, "features"), os.path.join(root, "features"))  # featurized already
    cfg = compose_config("pretrain", [f"root={root}", "recipe=pretrained", "recipe.pretrain.train.steps=3",
                                      "recipe.pretrain.train.num_workers=1", "recipe.pretrain.train.checkpoint_every=2",
                                      "recipe.pretrain.train.batch_size=8"])
    assert cfg.recipe.pretrain.train.name == "pretrain"
    out = pretrain_job.run(cfg)
    assert out["stage"] == "pretrain" and out["steps"] == 3 and out["encoder"] == f"{root}/models/pretrain/encoder.pt"
    member, = members(recipe_from_config(cfg.recipe), {}, out["encoder"])
    assert member["embedder"] == "encoder" and member["params"]["checkpoint"] == out["encoder"]
    assert member["params"]["pool"] == "freq_meanstd"
    assert load_checkpoint(out["encoder"]).cfg == get_config("tiny")
    with pytest.raises(ValueError, match="pre-trains nothing"):
        pretrain_job.run(compose_config("pretrain", [f"root={root}", "recipe=cnn"]))


@pytest.mark.gpu
def test_gpu_bf16_nccl_single_worker(feat_root, tmp_path):
    cfg = _tcfg(steps=4, checkpoint_every=2, num_workers=1, use_gpu=True, bf16=True, cpus_per_worker=1,
                storage_path=str(tmp_path / "ckpt"), name="gpu")
    res = fit(Data2VecObjective(PretrainConfig(**TINY)), feat_root, cfg)
    assert res.step == 4 and res.workers[0]["device"].startswith("cuda")
    assert np.isfinite(res.final_loss)


@pytest.mark.parametrize("rel_pos", [False, True])
def test_front_end_shared_by_the_clones_gives_the_per_clone_result_with_fewer_flops(rel_pos):
    """The student's front end runs once per clip and is shared by its masked clones: the same
    predictions as running it once per clone (the clip repeated), for fewer FLOPs."""
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from asd.models.encoder import CONFIGS
    from asd.stages.pretrain import PretrainModel, make_mask

    enc = replace(CONFIGS["tiny"], relative_position_embedding=rel_pos, gru_rel_pos=rel_pos, num_buckets=32,
                  max_distance=64)
    pcfg = PretrainConfig(decoder_dim=32, decoder_layers=1, decoder_groups=8)
    torch.manual_seed(0)
    model = PretrainModel(enc, pcfg).eval()
    fbank = torch.randn(2, 96, 128)
    c = 3
    mask = make_mask(2 * c, (96 // 16, 128 // 16), 0.6, "block", 3, "cpu")
    with torch.no_grad():
        shared = model(fbank, mask, clones=c)
        per_clone = model(fbank.repeat_interleave(c, dim=0), mask)  # what every clone computed before
        one = model(fbank, mask[::c], clones=1)
    for a, b in zip(shared, per_clone):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert torch.allclose(one[0], shared[0][::c], atol=1e-5)  # one clone: unchanged
    flops = []
    for args in ((fbank, mask, c), (fbank.repeat_interleave(c, dim=0), mask, 1)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(*args)
        flops.append(counter.get_total_flops())
    assert flops[0] < flops[1]


def test_streamed_training_data_keeps_every_row_once(feat_root):
    """Shards too large to cache stream their feature files in a random block order: every
    training row still comes exactly once per pass. (Ray Data's read order is not fixed even
    without it, so the order itself is not compared here.)"""
    from asd.training.fit import _training_dataset

    cfg = TrainConfig(splits=("train",))
    plain = [r["clip_id"] for r in _training_dataset(feat_root, cfg, ()).iter_rows()]
    streamed = [r["clip_id"] for r in _training_dataset(feat_root, cfg, (), streamed=True).iter_rows()]
    assert len(set(plain)) == len(plain) > 0 and sorted(plain) == sorted(streamed)


def test_kept_index_from_the_known_count_is_the_counted_one():
    """The pre-training step passes the kept count make_mask guarantees (no device sync to count it)."""
    from asd.stages.pretrain import kept_count, make_mask

    for ratio, kind in ((0.75, "block"), (0.5, "random"), (0.95, "block")):
        mask = make_mask(6, (4, 8), ratio, kind, 3, "cpu")
        counted = AudioEncoder.kept_index(mask, 32)
        known = AudioEncoder.kept_index(mask, 32, kept_count(32, ratio))
        assert torch.equal(counted, known) and known.shape == (6, kept_count(32, ratio))
        assert not mask.gather(1, known).any()  # the indices are the kept patches
