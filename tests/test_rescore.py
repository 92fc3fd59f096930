"""Nightly rescoring: incremental by content hash, idempotent, crash-safe, on local disk and S3."""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from asd.io import layout, storage
from asd.io.serving import current_model, set_current_model
from asd.stages import rescore as rescore_mod
from asd.stages.embed import EmbedConfig, embed
from asd.stages.featurize import FeaturizeConfig, featurize
from asd.stages.rescore import RescoreConfig, rescore
from asd.stages.score import ScoreConfig

CFG = RescoreConfig(featurize=FeaturizeConfig(progress=False), score=ScoreConfig(progress=False))


@pytest.fixture(scope="module")
def served(ray_session, small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    featurize(small_corpus, str(root), FeaturizeConfig(progress=False))
    embed(str(root), "logmel", EmbedConfig(progress=False))
    set_current_model(str(root), "logmel", "logmel_stats", {})
    return root


def _night(corpus, inbox, picks, start=0):
    """Copy test clips into an inbox under evaluation-style names (no label, no domain)."""
    files = sorted(Path(corpus).glob("*/test/*.wav"))
    for i, f in enumerate(files[picks]):
        dst = Path(inbox) / f.parent.parent.name / "test" / f"section_00_{start + i:04d}.wav"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    return files[picks]


def _copy_root(served, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(served, root)
    set_current_model(str(root), "logmel", "logmel_stats", {})  # point at this copy's embeddings
    return root


def test_night_is_scored_once_and_rerun_changes_nothing(served, small_corpus, tmp_path):
    root = _copy_root(served, tmp_path)
    inbox = tmp_path / "inbox" / "2026-11-24"
    _night(small_corpus, inbox, slice(0, 12))
    first = rescore(str(inbox), str(root), date="2026-11-24", cfg=CFG)
    assert first.n_new == 12 and first.changed
    part = Path(first.partition)
    table = pq.read_table(part / "scores.parquet")
    assert table.num_rows == 12 and set(table.column("date").to_pylist()) == {"2026-11-24"}
    assert (part / "_SUCCESS").exists() and list(part.glob("anomaly_score_*_section_00_test.csv"))
    summary = storage.read_json(str(part / "summary.json"))
    assert summary["clips"] == 12 and summary["anomalies_above_threshold"] == first.n_anomalies
    before = (part / "scores.parquet").read_bytes()

    again = rescore(str(inbox), str(root), date="2026-11-24", cfg=CFG)
    assert again.n_new == 0 and not again.changed and (part / "scores.parquet").read_bytes() == before

    # three more clips arrive, and one clip already scored arrives again under a new name
    _night(small_corpus, inbox, slice(12, 15), start=100)
    dup = sorted(Path(small_corpus).glob("*/test/*.wav"))[0]
    shutil.copy(dup, inbox / dup.parent.parent.name / "test" / "section_00_0999.wav")
    third = rescore(str(inbox), str(root), date="2026-11-24", cfg=CFG)
    assert third.n_new == 3 and third.n_already_scored == 13
    assert pq.read_table(part / "scores.parquet").num_rows == 15

    # the next night: clips whose bytes were scored before are skipped
    inbox2 = tmp_path / "inbox" / "2026-11-25"
    _night(small_corpus, inbox2, slice(10, 20))
    nxt = rescore(str(inbox2), str(root), date="2026-11-25", cfg=CFG)
    assert nxt.n_new == 5 and nxt.n_already_scored == 5


def test_interrupted_night_reruns_to_the_same_table(served, small_corpus, tmp_path, monkeypatch):
    clean = _copy_root(served, tmp_path / "a")
    crashy = _copy_root(served, tmp_path / "b")
    inbox = tmp_path / "inbox"
    _night(small_corpus, inbox, slice(0, 10))
    ref = rescore(str(inbox), str(clean), date="2026-11-24", cfg=CFG)

    def boom(*a, **k):
        raise RuntimeError("killed before publishing")

    monkeypatch.setattr(rescore_mod, "_publish_night", boom)
    with pytest.raises(RuntimeError):
        rescore(str(inbox), str(crashy), date="2026-11-24", cfg=CFG)
    assert not storage.is_published(layout.rescore_partition_dir(str(crashy), "2026-11-24"))
    monkeypatch.undo()
    done = rescore(str(inbox), str(crashy), date="2026-11-24", cfg=CFG)
    assert done.n_new == ref.n_new == 10
    assert pq.read_table(Path(done.partition) / "scores.parquet").equals(
        pq.read_table(Path(ref.partition) / "scores.parquet"))


def test_no_serving_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="models/CURRENT"):
        current_model(str(tmp_path))
    with pytest.raises(ValueError):
        rescore(str(tmp_path), str(tmp_path), date="2026-13-45", cfg=CFG)


@pytest.mark.s3
def test_rescore_on_s3(served, small_corpus, tmp_path, s3_bucket):
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(served) + "/", f"{s3_bucket}/root/", recursive=True)
    set_current_model(f"{s3_bucket}/root", "logmel", "logmel_stats", {})
    _night(small_corpus, tmp_path / "inbox", slice(0, 6))
    fs.put(str(tmp_path / "inbox") + "/", f"{s3_bucket}/inbox/2026-11-24/", recursive=True)
    res = rescore(f"{s3_bucket}/inbox/2026-11-24", f"{s3_bucket}/root", date="2026-11-24", cfg=CFG)
    assert res.n_new == 6 and storage.is_published(res.partition)
    assert rescore(f"{s3_bucket}/inbox/2026-11-24", f"{s3_bucket}/root", date="2026-11-24", cfg=CFG).n_new == 0


def test_a_score_fused_model_is_rescored_member_by_member(served, small_corpus, tmp_path):
    """A served ``concat`` model with ``fusion: score`` (the pipeline's default recipe): the nightly scores
    are the weighted sums of each member's own kNN distance, from the blocks recorded with its embeddings."""
    import numpy as np
    import torch

    from asd.algorithms import knn
    from asd.models.cnn import CNNConfig, CNNEncoder
    from asd.models.registry import save_checkpoint
    from asd.stores.embeddings import embedding_blocks, read_embeddings, vectors

    root = _copy_root(served, tmp_path)
    torch.manual_seed(0)
    ckpts = [save_checkpoint(CNNEncoder(CNNConfig(channels=(4, 4, 8), embed_dim=8)).eval(), str(tmp_path / f"c{i}.pt"))
             for i in range(2)]
    params = {"fusion": "score", "members": [{"embedder": "encoder", "weight": w, "params": {"checkpoint": c,
                                                                                          "device": "cpu"}}
                                             for c, w in zip(ckpts, (1.0, 0.5))]}
    emb = embed(str(root), "fused", EmbedConfig(embedder="concat", params=params, num_actors=1, progress=False))
    assert embedding_blocks(emb.embeddings) == [{"dim": 8, "weight": 1.0}, {"dim": 8, "weight": 0.5}]
    set_current_model(str(root), "fused", "concat", params)
    inbox = tmp_path / "inbox" / "2026-11-26"
    clips = _night(small_corpus, inbox, slice(0, 3))
    night = rescore(str(inbox), str(root), date="2026-11-26", cfg=CFG)
    assert night.n_new == 3
    got = pq.read_table(Path(night.partition) / "scores.parquet").sort_by("clip_id").to_pylist()
    # by hand: the training clips of the first clip's group, one bank per member, the weighted sum
    e = read_embeddings(emb.embeddings)
    rows = e.to_pylist()
    mt = clips[0].parent.parent.name
    first = next(r for r in got if r["clip_id"].endswith("section_00_0000.wav") and r["machine_type"] == mt)
    train = [i for i, r in enumerate(rows) if r["split"] == "train" and r["machine_type"] == mt
             and r["section"] == first["section"]]
    # the night's clip is a copy of this test clip: the same bytes, the same embedding
    test_row = next(i for i, r in enumerate(rows) if r["clip_id"].endswith(clips[0].name) and r["machine_type"] == mt)
    vec = vectors(e)
    doms = [rows[i]["domain"] for i in train]
    expect = sum(w * float(knn.MemoryBank.build(vec[train, a:a + 8], doms).score_parts(vec[test_row:test_row + 1, a:a + 8])[0][0])
                 for a, w in ((0, 1.0), (8, 0.5)))
    assert first["score"] == pytest.approx(expect, rel=1e-4)
    assert np.isfinite([r["threshold"] for r in got]).all()
