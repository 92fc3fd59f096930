"""Embedding and scoring stages end to end on generated data, locally and on S3."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from asd.io import storage
from asd.models.embedders import LogMelStats
from asd.reports import metrics
from asd.stages.embed import EmbedConfig, embed
from asd.stages.featurize import FeaturizeConfig, featurize
from asd.stages.score import ScoreConfig, build_banks, score
from asd.stores.embeddings import read_embeddings, vectors
from tests.pngs import assert_drawn_png

FCFG = FeaturizeConfig(progress=False, rows_per_block=32)
ECFG = EmbedConfig(progress=False)
SCFG = ScoreConfig(progress=False)


@pytest.fixture(scope="module")
def scored_run(ray_session, small_corpus, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("run"))
    featurize(small_corpus, root, FCFG)
    emb = embed(root, "logmel", ECFG)
    res = score(emb.embeddings, storage.join(root, "scores", "logmel"), SCFG)
    return root, emb, res


def test_logmel_stats_embedding():
    fb = np.stack([np.arange(4.0), np.arange(4.0) * 3]).astype(np.float32)  # 2 frames, 4 bins
    e = LogMelStats()([fb])
    raw = np.concatenate([fb.mean(0), fb.std(0)])
    assert e.shape == (1, 8) and np.allclose(e[0], raw / np.linalg.norm(raw))
    assert LogMelStats(deltas=True)([fb]).shape == (1, 16)


def test_embeddings_cover_every_clip(scored_run):
    root, emb, _ = scored_run
    t = read_embeddings(emb.embeddings)
    assert t.num_rows == emb.n_clips and emb.dim == 256
    v = vectors(t)
    assert v.shape == (t.num_rows, 256) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert len(set(t.column("clip_id").to_pylist())) == t.num_rows


def test_scores_are_well_above_chance_and_match_official_metrics(scored_run):
    root, emb, res = scored_run
    assert res.official_score is not None and res.official_score > 0.6
    scores = pq.read_table(storage.join(res.scores, "scores.parquet"))
    assert scores.num_rows == res.n_scored
    assert set(scores.column("clip_id").to_pylist()) == set(
        read_embeddings(emb.embeddings).filter(pq_filter_test()).column("clip_id").to_pylist())
    # the published metrics are the official metrics of the published scores
    m = metrics.evaluate_table(scores)
    assert m.official_score == pytest.approx(res.official_score)
    assert json.loads(storage.read_text(storage.join(res.scores, "metrics.json")))["official_score"] == pytest.approx(res.official_score)
    for png in ("roc.png", "histograms.png"):
        assert_drawn_png(storage.read_bytes(storage.join(res.scores, png)))


def pq_filter_test():
    import pyarrow.compute as pc

    return pc.field("split") == "test"


def test_dcase_csvs(scored_run):
    _, _, res = scored_run
    scores = pq.read_table(storage.join(res.scores, "scores.parquet")).to_pylist()
    for mt in {r["machine_type"] for r in scores}:
        rows = metrics.read_result_csv(storage.join(res.scores, f"anomaly_score_{mt}_section_00_test.csv"))
        mine = {os.path.basename(r["clip_id"]): r["score"] for r in scores if r["machine_type"] == mt}
        assert {n: pytest.approx(s, rel=1e-6) for n, s in rows} == mine
        dec = metrics.read_result_csv(storage.join(res.scores, f"decision_result_{mt}_section_00_test.csv"))
        assert {v for _, v in dec} <= {0, 1} and len(dec) == len(mine)
        with open(storage.join(res.scores, f"anomaly_score_{mt}_section_00_test.csv")) as f:
            first = f.readline().strip().split(",")
        assert first[0].startswith("section_00_") and first[0].endswith(".wav") and float(first[1]) >= 0


def test_test_clips_are_scored_against_the_min_of_both_banks(scored_run):
    root, emb, res = scored_run
    table = read_embeddings(emb.embeddings)
    rows = table.to_pylist()
    train = table.filter(pq_filter_train())
    banks, thresholds = build_banks(train, SCFG)
    scores = {r["clip_id"]: r for r in pq.read_table(storage.join(res.scores, "scores.parquet")).to_pylist()}
    v = vectors(table)
    for i, r in enumerate(rows):
        if r["split"] != "test":
            continue
        same = [j for j, q in enumerate(rows) if q["split"] == "train" and q["machine_type"] == r["machine_type"]]
        src = [j for j in same if rows[j]["domain"] == "source"]
        tgt = [j for j in same if rows[j]["domain"] == "target"]
        d_src = 1 - max(float(v[i] @ v[j]) for j in src)
        d_tgt = 1 - max(float(v[i] @ v[j]) for j in tgt)
        s = scores[r["clip_id"]]
        assert s["score_source"] == pytest.approx(d_src, abs=1e-5)
        assert s["score_target"] == pytest.approx(d_tgt, abs=1e-5)
        assert s["score"] == pytest.approx(min(d_src, d_tgt), abs=1e-5)
        assert s["decision"] == int(s["score"] > thresholds[(r["machine_type"], r["section"])])
        # the training clip the score came from: the nearest clip of the bank that gave the minimum
        pool = src if d_src <= d_tgt else tgt
        assert s["neighbour_clip_id"] == rows[max(pool, key=lambda j: float(v[i] @ v[j]))]["clip_id"]


def pq_filter_train():
    import pyarrow.compute as pc

    return pc.field("split") == "train"


@pytest.mark.s3
def test_scores_identical_on_s3(scored_run, s3_bucket, small_corpus):
    root, _, res = scored_run
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(small_corpus + "/", f"{s3_bucket}/corpus/", recursive=True)
    remote_root = f"{s3_bucket}/run"
    featurize(f"{s3_bucket}/corpus", remote_root, FCFG)
    emb = embed(remote_root, "logmel", ECFG)
    remote = score(emb.embeddings, storage.join(remote_root, "scores", "logmel"), SCFG)
    a = pq.read_table(storage.join(res.scores, "scores.parquet"))
    b = storage.read_table(storage.join(remote.scores, "scores.parquet"))
    assert a.equals(b)
    assert storage.is_published(remote.scores)
    assert storage.read_text(storage.join(remote.scores, "report.md")) == storage.read_text(
        storage.join(res.scores, "report.md"))


def test_unpublished_embeddings_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="_SUCCESS"):
        score(str(tmp_path / "embeddings" / "none"), str(tmp_path / "scores"), SCFG)


@pytest.mark.slow
def test_pipeline_job_end_to_end(tmp_path):
    """The README's main command on a small generated corpus, as a user runs it (shorter training)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", ASD_HYDRA_DIR=str(tmp_path / "hydra"))
    short = ["pretrain.train.steps=6", "pretrain.train.checkpoint_every=3"] + [
        f"models.{m}.train.{k}" for m in ("finetune", "cnn", "mod") for k in ("steps=4", "checkpoint_every=2")]
    cmd = [sys.executable, "-m", "jobs.pipeline", f"root={tmp_path}/run", "ray.num_cpus=2", "ray.progress=false",
           "data.spec.n_train_source=10", "data.spec.n_train_target=2", "data.spec.n_test_per_domain=6",
           "data.spec.duration_s=1.0", "recipe_overrides=[" + ",".join(f"'{o}'" for o in short) + "]"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(final["stages"]) == {"make_corpus", "featurize", "recipes"}
    every = {"logmel", "pretrained", "finetuned", "cnn", "mod", "fused"}
    recipes = final["stages"]["recipes"]
    assert set(recipes) == set(final["official_scores"]) == every
    # the headline is the served recipe's (models/CURRENT), the other recipes follow
    current = json.load(open(tmp_path / "run" / "models" / "CURRENT"))
    served_metrics = json.load(open(tmp_path / "run" / "scores" / "fused" / "metrics.json"))
    assert current["recipe"] == current["tag"] == final["serving_model"] == final["served"]["recipe"] == "fused"
    assert final["official_score"] == served_metrics["official_score"] == final["official_scores"]["fused"]
    assert final["report"].endswith("scores/fused/report.md") and os.path.exists(final["report"])
    assert f"served recipe (fused, models/CURRENT): official score {100 * final['official_score']:.2f} %" in out.stdout
    assert "official score (hmean)" in out.stdout and 0 <= final["official_score"] <= 1
    assert os.path.exists(final["comparison"]) and "finetuned" in open(final["comparison"]).read()
    # log-mel statistics -> pseudo labels -> the transformer fine-tuned from the pre-trained encoder and
    # the two CNNs trained from scratch, all on those labels, each trained once -> scored
    labels = f"{tmp_path}/run/labels/logmel"
    assert {recipes[r]["labels"]["labels"] for r in ("finetuned", "cnn", "mod", "fused")} == {labels}
    ft = recipes["finetuned"]["models"]["finetune"]
    assert ft["steps"] == 4 and ft["num_classes"] >= 4 and ft["encoders"] == [f"{tmp_path}/run/models/finetune/encoder.pt"]
    ft_cnn, ft_mod = recipes["fused"]["models"]["cnn"], recipes["fused"]["models"]["mod"]
    assert ft_cnn == recipes["cnn"]["models"]["cnn"] and ft_mod == recipes["mod"]["models"]["mod"]
    assert ft_cnn["steps"] == 4 and ft_cnn["num_classes"] == ft["num_classes"]
    assert ft_cnn["encoders"] == [f"{tmp_path}/run/models/cnn/encoder.pt"]
    assert ft_mod["steps"] == 4 and ft_mod["num_classes"] == ft["num_classes"]
    mods = ft_mod["encoders"]  # five modulation CNNs from one training run
    assert mods == [f"{tmp_path}/run/models/mod{f'-m{i}' if i else ''}/encoder.pt" for i in range(5)]
    assert current["embedder"] == "concat" and current["params"]["fusion"] == "score"
    assert [m["params"]["checkpoint"] for m in current["params"]["members"]] == [*ft_cnn["encoders"], *mods]
    assert [m["weight"] for m in current["params"]["members"]] == [1.0] + [0.2] * 5
    # the served embeddings record their blocks: scoring sums each member's own kNN distance
    info = json.load(open(tmp_path / "run" / "embeddings" / "fused" / "_SUCCESS"))
    assert [b["weight"] for b in info["blocks"]] == [1.0] + [0.2] * 5 and sum(b["dim"] for b in info["blocks"]) == info["dim"]
    assert recipes["pretrained"]["pretrain"]["steps"] == 6
    # a second run regenerates nothing and featurizes nothing new
    out2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out2.returncode == 0, out2.stderr[-3000:]
    final2 = json.loads(out2.stdout.strip().splitlines()[-1])
    assert final2["stages"]["make_corpus"]["skipped"] and final2["stages"]["featurize"]["n_featurized"] == 0
    assert final2["official_score"] == pytest.approx(final["official_score"])
    again = final2["stages"]["recipes"]
    assert again["pretrained"]["pretrain"]["start_step"] == 6  # the finished pre-training is not redone
    assert again["finetuned"]["models"]["finetune"]["start_step"] == 4  # nor the fine-tuning
    assert again["fused"]["models"]["cnn"]["start_step"] == 4


def test_scoring_workers_fetch_the_banks_once_per_run(ray_session):
    import ray

    from asd.stages import score as score_mod

    first = ray.put({"banks": np.arange(4.0)})
    got = score_mod._worker_banks(first)
    assert score_mod._worker_banks(first) is got  # a later batch of the run: no second fetch
    second = ray.put({"banks": np.arange(3.0)})
    assert len(score_mod._worker_banks(second)["banks"]) == 3  # a new run's banks replace the last
    assert list(score_mod._WORKER_BANKS) == [second.hex()]
    assert score_mod._worker_banks({"inline": 1}) == {"inline": 1}  # banks passed by value


def test_collecting_blocks_drops_those_a_filter_left_empty(ray_session):
    """A feature file holding only training clips leaves an empty block (possibly with no columns)
    after the test-split filter; collecting the scored blocks must not trip over it."""
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data.expressions import col

    from asd.stages.score import SCORE_SCHEMA

    def rows(ids, split):
        return pa.table({"clip_id": ids, "split": [split] * len(ids), "score": [0.5] * len(ids)})

    class Refs:  # what the AE scorer met: a column-less empty block beside real ones
        def to_arrow_refs(self):
            return [ray.put(pa.table({})), ray.put(rows(["b", "a"], "test")), ray.put(rows([], "test"))]

    schema = pa.schema([("clip_id", pa.string()), ("split", pa.string()), ("score", pa.float64())])
    with pytest.raises(pa.ArrowInvalid):
        pa.concat_tables([ray.get(r) for r in Refs().to_arrow_refs()])
    got = storage.collect_tables(Refs(), schema)
    assert got.schema == schema and got.column("clip_id").to_pylist() == ["b", "a"]
    ds = ray.data.from_arrow([rows(["t1", "t2"], "train"), rows(["x", "y"], "test"), rows(["t3"], "train")])
    ds = ds.filter(expr=col("split") == "test")
    assert sorted(storage.collect_tables(ds, schema).column("clip_id").to_pylist()) == ["x", "y"]
    assert storage.collect_tables(ds.filter(expr=col("split") == "none"), SCORE_SCHEMA).schema == SCORE_SCHEMA
