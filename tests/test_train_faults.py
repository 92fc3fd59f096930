"""Training faults: a corrupt latest checkpoint falls back to the previous kept one, with a
warning naming it (driver-side reads and Ray Train restores alike); none readable is a clear error."""

from __future__ import annotations

import glob
import io
import logging
import os

import pytest
import torch

from asd.io import storage
from asd.stages.featurize import FeaturizeConfig, featurize
from asd.stages.pretrain import Data2VecObjective, PretrainConfig
from asd.training.checkpoints import (
    CheckpointUnreadable,
    checkpoint_dir_name,
    export_encoder,
    load_state_with_fallback,
    load_training_state,
)
from asd.training.fit import fit
from asd.training.loop import TrainConfig

TINY = {"model": "tiny", "clone_batch": 2, "decoder_dim": 64, "decoder_layers": 1, "top_k_layers": 2,
        "ema_start": 0.99, "ema_end": 0.999}


def _corrupt(checkpoint_uri: str) -> None:
    """Truncate the checkpoint's state.pt to half its size (a torn upload)."""
    uri = storage.join(checkpoint_uri, "state.pt")
    data = storage.read_bytes(uri)
    storage.atomic_write_bytes(uri, data[: len(data) // 2])


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    """A storage folder for one test: local, or on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"{request.getfixturevalue('s3_bucket')}/store"


def _kept(run: str) -> list[str]:
    fs, path = storage.filesystem(run)
    return sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
                  if n.startswith("step-"))


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(store, caplog):
    run_folder = storage.join(store, "ckpt", "run")
    for step in (4, 8, 10):
        buf = io.BytesIO()
        torch.save({"module": {"w": torch.full((3,), float(step))}, "step": step}, buf)
        storage.atomic_write_bytes(storage.join(run_folder, f"step-{step:08d}", "state.pt"), buf.getvalue())
        storage.atomic_write_json(storage.join(run_folder, f"step-{step:08d}", "meta.json"), {"step": step})
    storage.atomic_write_json(storage.join(run_folder, "checkpoint_manager_snapshot.json"), {})  # not a checkpoint
    latest = storage.join(run_folder, "step-00000010")
    assert load_training_state(latest)["step"] == 10

    _corrupt(latest)
    with caplog.at_level(logging.WARNING, logger="asd.training.fit"):
        state, used, skipped = load_state_with_fallback(latest)
    assert state["step"] == 8 and torch.equal(state["module"]["w"], torch.full((3,), 8.0))
    assert used == storage.join(run_folder, "step-00000008") and skipped == [latest]
    assert any("step-00000010" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert load_training_state(latest)["step"] == 8
    with pytest.raises(CheckpointUnreadable, match="step-00000010"):
        load_training_state(latest, fallback=False)

    storage.atomic_write_bytes(storage.join(run_folder, "step-00000008", "state.pt"), b"not a torch file")
    state, used, skipped = load_state_with_fallback(latest)
    assert state["step"] == 4 and len(skipped) == 2

    storage.remove(storage.join(run_folder, "step-00000004", "state.pt"))
    with pytest.raises(CheckpointUnreadable, match="no readable checkpoint at or before step-00000010") as exc:
        load_training_state(latest)
    assert "step-00000004/state.pt is missing" in str(exc.value)


def test_checkpoint_written_again_after_a_fallback_gets_a_name_of_its_own():
    assert checkpoint_dir_name(12) == "step-00000012"
    assert checkpoint_dir_name(10, ["/r/step-00000010"]) == "step-00000010-1"
    assert checkpoint_dir_name(10, ["s3://b/r/step-00000010", "s3://b/r/step-00000010-1"]) == "step-00000010-2"


@pytest.fixture(scope="module")
def feat_root(small_corpus, ray_session, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults_root"))
    featurize(small_corpus, root, FeaturizeConfig(progress=False))
    return root


def _ray_logs_mentioning(text: str) -> list[str]:
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    hits = []
    for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True):
        if os.path.isfile(path) and path.endswith((".err", ".out", ".log")):
            with open(path, errors="replace") as f:
                if text in f.read():
                    hits.append(path)
    return hits


@pytest.mark.slow
def test_ray_train_resumes_from_the_previous_checkpoint_when_the_latest_is_corrupt(feat_root, store, caplog):
    """A finished 10-step run keeps step-8 and step-10; step-10's state.pt is torn. Exporting
    it falls back to step 8; rerunning the run restores step 8 on the worker (with a warning),
    trains steps 9-10 again to the same weights and checkpoints them under a new name."""
    cfg = TrainConfig(steps=10, batch_size=8, lr=1e-3, warmup_steps=2, crop_frames=192, log_every=1,
                      checkpoint_every=4, num_to_keep=2, num_workers=1, storage_path=storage.join(store, "ckpt"),
                      name="faults")
    obj = Data2VecObjective(PretrainConfig(**TINY))
    first = fit(obj, feat_root, cfg)
    assert first.step == 10 and first.checkpoint == storage.join(first.run, "step-00000010")
    assert _kept(first.run) == ["step-00000008", "step-00000010"]
    _corrupt(first.checkpoint)

    # driver side: export from the corrupt latest checkpoint uses step 8, and says so
    with caplog.at_level(logging.WARNING, logger="asd.training.fit"):
        uri = export_encoder(obj, first.checkpoint, storage.join(store, "out"), "pretrain")
    assert any("step-00000010" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    meta = storage.read_json(storage.join(store, "out", "models", "pretrain", "config.json"))["meta"]
    assert meta["step"] == 8 and meta["checkpoint"] == storage.join(first.run, "step-00000008") and uri

    # worker side: the rerun restores step 8, not step 0, and not the corrupt step 10
    res = fit(obj, feat_root, cfg)
    w = res.workers[0]
    assert res.start_step == 8 and res.step == 10 and w["start_step"] == 8
    assert w["restored_from"] == storage.join(first.run, "step-00000008")
    assert w["unreadable_checkpoints"] == [first.checkpoint]
    assert [h["step"] for h in res.history] == list(range(1, 11))  # history up to step 8 came from the checkpoint
    assert w["param_checksum"] == first.workers[0]["param_checksum"]  # the same weights as the first run
    assert res.checkpoint == storage.join(first.run, "step-00000010-1")
    assert load_training_state(res.checkpoint)["step"] == 10
    # num_to_keep rotated step-8 out; the corrupt folder is Ray Train's, still tracked, kept apart
    assert _kept(first.run) == ["step-00000010", "step-00000010-1"]
    assert _ray_logs_mentioning(f"{storage.join(first.checkpoint, 'state.pt')} is unreadable"), "no warning logged"
