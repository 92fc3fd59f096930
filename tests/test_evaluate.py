"""The evaluation run (asd.recipes.evaluate, jobs.evaluate): the split rule, checksums and prerequisites
without Ray; recipes and the baselines end to end on tiny generated corpora; the real RoboticArm data."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pytest

from asd.io import storage
from asd.recipes.evaluate import EvaluateConfig, MethodUnavailable, evaluate
from asd.recipes.recipe import EmbedEntry, Model, Recipe
from asd.recipes.split import EXCLUDED, TEST, TRAIN, data_sha256, plan_split


def _keys(rows):
    cols = ["clip_id", "machine_type", "section", "domain", "split", "label", "content_sha256"]
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)})


def _clip(mt, split, domain, label, i, sha=None):
    return (f"{mt}/{split}/section_00_{domain}_{split}_{label}_{i:04d}.wav", mt, "00", domain, split, label,
            sha or f"sha-{mt}-{split}-{domain}-{label}-{i}")


# ----------------------------------------------------------------------------- the split, no Ray


def test_split_keeps_train_folders_and_excludes_anomalies_and_duplicates():
    rows = [_clip("fan", "train", "source", "normal", i) for i in range(3)]
    rows += [_clip("fan", "train", "source", "anomaly", 9)]
    rows += [_clip("fan", "test", "source", "normal", i) for i in range(2)]
    rows += [_clip("fan", "test", "target", "anomaly", 5, sha="sha-fan-train-source-normal-1")]  # a copy
    plan = plan_split(_keys(rows))
    role = dict(zip(plan.table.column("clip_id").to_pylist(), plan.table.column("role").to_pylist()))
    assert [role[r[0]] for r in rows] == [TRAIN] * 3 + [EXCLUDED] + [TEST] * 2 + [EXCLUDED]
    reasons = {e["clip_id"]: e["reason"] for e in plan.excluded()}
    assert reasons[rows[-1][0]] == f"same audio bytes as training clip {rows[1][0]}"
    assert reasons[rows[3][0]] == "anomalous clip in the train split"
    assert plan.derived == [] and plan.counts()["fan"][TRAIN] == 3


def test_split_derives_a_training_split_deterministically_when_a_section_has_none():
    rows = [_clip("pump", "test", d, lab, i) for d in ("source", "target") for lab in ("normal", "anomaly")
            for i in range(5)]
    rows += [_clip("fan", "train", "source", "normal", 0), _clip("fan", "test", "source", "normal", 1)]
    plan = plan_split(_keys(rows), derive_fraction=0.5)
    again = plan_split(_keys(list(reversed(rows))), derive_fraction=0.5)
    assert plan.sha256() == again.sha256()  # independent of listing order
    train = sorted(c for c in plan.train_ids if c.startswith("pump"))
    assert len(train) == 4 and all("_normal_" in c for c in train)  # floor(5 * 0.5) per domain, normals only
    assert plan.derived == [{"machine_type": "pump", "section": "00", "train_clips": {"source": 2, "target": 2},
                             "test_clips_left": 16}]
    assert not plan.train_ids & plan.test_ids
    assert {c for c in plan.test_ids if c.startswith("pump")} >= {r[0] for r in rows if "anomaly" in r[0]}
    with pytest.raises(ValueError, match="no training split can be formed"):
        plan_split(_keys([_clip("x", "test", "source", "normal", 0), _clip("x", "test", "source", "anomaly", 1)]))
    with pytest.raises(ValueError, match="derive_fraction"):
        plan_split(_keys(rows), derive_fraction=1.0)


def test_data_checksum_is_order_independent_and_content_sensitive():
    rows = [_clip("fan", "train", "source", "normal", i) for i in range(3)]
    assert data_sha256(_keys(rows)) == data_sha256(_keys(rows[::-1]))
    changed = rows[:2] + [rows[2][:6] + ("other",)]
    assert data_sha256(_keys(rows)) != data_sha256(_keys(changed))


def test_unknown_methods_and_missing_prerequisites_fail_before_any_work(tmp_path):
    from jobs.common import compose_config, compose_recipes

    with pytest.raises(ValueError, match="unknown baselines"):
        EvaluateConfig(baselines=("svm",))
    with pytest.raises(ValueError, match="listed twice"):
        EvaluateConfig(recipes=[Recipe(name="logmel"), Recipe(name="logmel")])
    cfg = compose_config("evaluate")
    with pytest.raises(ValueError, match="unknown recipe 'svm'"):
        compose_recipes(cfg, ["svm"])
    missing = str(tmp_path / "missing.pt")
    with pytest.raises(MethodUnavailable, match="recipe pre: encoder .* does not exist"):
        evaluate(str(tmp_path / "nowhere"), str(tmp_path / "root"),
                 EvaluateConfig(recipes=[Recipe(name="pre", encoder=missing, embed=[EmbedEntry(source="pretrained")])]))
    with pytest.raises(MethodUnavailable, match="models.cnn.checkpoint .* does not exist"):
        evaluate(str(tmp_path / "nowhere"), str(tmp_path / "root"),
                 EvaluateConfig(recipes=[Recipe(name="c", models={"cnn": Model(checkpoint=missing)},
                                                labels=compose_recipes(cfg, ["cnn"])["cnn"].labels,
                                                embed=[EmbedEntry(source="cnn")])]))
    assert not (tmp_path / "root").exists()


# ----------------------------------------------------------------------------- the job

TINY_CNN = ["models.cnn.model_cfg.channels=[4,8,8]", "models.cnn.model_cfg.embed_dim=16", "models.cnn.train.steps=4",
            "models.cnn.train.crop_frames=64", "models.cnn.train.batch_size=8", "models.cnn.train.cpus_per_worker=0.5",
            "models.cnn.train.torch_threads=1", "labels.cluster.n_clusters=2"]
TINY_MOD = ["models.mod.model_cfg.channels=[8,8]", "models.mod.model_cfg.pooled=4", "models.mod.model_cfg.embed_dim=8",
            "models.mod.train.steps=4", "models.mod.train.batch_size=8", "models.mod.train.cpus_per_worker=0.5",
            "models.mod.train.torch_threads=1", "models.mod.members=2"]


def _compose(*overrides, recipe_overrides=()):
    """jobs.evaluate's config; ``recipe_overrides`` apply to every recipe of the run that has the key."""
    from jobs.common import compose_config

    cfg = compose_config("evaluate", ["ray.progress=false", "embed.num_actors=1", "score.concurrency=1", "plots=false",
                                      *overrides])
    cfg.recipe_overrides = list(recipe_overrides)
    return cfg


@pytest.mark.slow
def test_job_on_a_test_only_corpus_writes_the_report_with_every_method(ray_session, tmp_path, monkeypatch):
    """A corpus without train folders: the split is derived from normal test clips, every method
    trains or banks on it and nothing of it is scored; md/json/png carry every method. The encoder
    pre-training is stubbed (it is Ray Train like the autoencoder, tested in test_pretrain.py): the
    stub checks it would train on exactly the split's training clips."""
    import asd.stages.pretrain
    from asd.data.synthetic import MachineSpec, default_spec, make_corpus
    from asd.models.encoder import AudioEncoder
    from asd.models.registry import save_checkpoint
    from asd.stores.features import read_features_table
    from jobs import evaluate as job

    corpus = tmp_path / "corpus"
    spec = default_spec(machine_types=[MachineSpec("fanlike")], n_train_source=2, n_train_target=2,
                        n_test_per_domain=8, duration_s=1.5, anomaly_strength=3.0, seed=5)
    make_corpus(spec, str(corpus), workers=1, progress=False)
    shutil.rmtree(corpus / "fanlike" / "train")  # no separate train split
    encoder = str(tmp_path / "encoders" / "encoder.pt")
    save_checkpoint(AudioEncoder("tiny"), encoder, meta={})
    pretrained_on = {}

    def fake_pretrain(features_root, out_root, pcfg, tcfg):
        rows = read_features_table(features_root, columns=["clip_id", "split", "label"]).to_pylist()
        pretrained_on.update(root=features_root, rows=rows, tag=pcfg.tag, name=tcfg.name)
        return asd.stages.pretrain.PretrainResult(checkpoint=None, run="", encoder=encoder, final_loss=0.5,
                                                  steps=tcfg.steps, start_step=0, seconds=0.0, samples_per_s=0.0)

    monkeypatch.setattr(asd.stages.pretrain, "pretrain", fake_pretrain)
    root = str(tmp_path / "run")
    recipes = ["logmel", "pretrained", "finetuned_ssl", "cnn_section"]
    cfg = _compose("data=dir", f"data.input={corpus}", f"root={root}", f"report_to={tmp_path}/copy/evaluate_test",
                   f"recipes=[{','.join(recipes)}]", "ae.epochs=3", "ae.num_actors=1",
                   recipe_overrides=["pretrain.train.steps=2", f"models.finetune.checkpoint={encoder}"])
    out = job.run(cfg)
    methods = ["ae_mse", "ae_mahalanobis", "logmel", "pretrained", "finetuned_ssl"]
    assert set(out["official_scores"]) == set(methods)
    for ext in ("md", "json", "png"):
        assert os.path.getsize(f"{root}/evaluate/report.{ext}") > 0
        assert os.path.getsize(f"{tmp_path}/copy/evaluate_test.{ext}") > 0
    with open(f"{root}/evaluate/report.json") as f:
        rep = json.load(f)
    assert rep["split"]["derived"][0]["train_clips"] == {"source": 2, "target": 2}  # floor(4 normals * 0.5)
    assert len(rep["data"]["sha256"]) == 64 and rep["data"]["clips"] == 16
    assert rep["config"]["job"]["recipes"] == recipes and rep["served_method"] == "fused"
    assert rep["methods"]["pretrained"]["info"]["pretrain"]["steps"] == 2
    assert rep["methods"]["finetuned_ssl"]["info"]["models"]["finetune"]["encoders"] == [encoder]  # not trained
    # one type with one section: section labels give one class, so cnn_section cannot train; the
    # report says so and the other methods are still reported
    assert list(rep["not_run"]) == ["cnn_section"] and "only one class" in rep["not_run"]["cnn_section"]
    assert "cnn_section" not in rep["methods"] and "cnn_section" not in rep["official_scores"]
    with open(f"{root}/evaluate/report.md") as f:
        md = f.read()
    assert "has no train split" in md and all(f"| {m} |" in md for m in methods)
    assert "| cnn_section | – |" in md and "not run: " in md
    assert "Autoencoder baseline as published: one model per machine type" in md and "ae_mse: " not in md
    assert "pretrained: encoder pre-trained in this run for 2 steps" in md
    train = {c for c, r in zip(*_split_rows(rep)) if r == TRAIN}
    assert len(train) == 4 and all("_normal_" in c for c in train)
    # the encoder would be pre-trained on a feature view of exactly the training clips
    assert pretrained_on["root"] == f"{root}/evaluate/train_view" and pretrained_on["tag"] == "pretrain"
    assert {r["clip_id"] for r in pretrained_on["rows"]} == train
    assert {r["split"] for r in pretrained_on["rows"]} == {"train"}
    ae = rep["methods"]["ae_mse"]["info"]["per_type"]["fanlike"]  # the autoencoder trains on exactly those clips
    assert (ae["train_clips"], ae["train_clips_source"], ae["train_clips_target"]) == (4, 2, 2)
    for m in methods:
        scored = storage.read_table(f"{root}/scores/{m}/scores.parquet").column("clip_id").to_pylist()
        assert len(scored) == 12 and not train & set(scored)
    assert all(0.0 <= v <= 1.0 for v in rep["official_scores"].values() if v is not None)


def _split_rows(rep):
    from asd.stores.features import read_features_table

    root = rep["root"]
    keys = read_features_table(root, columns=["clip_id", "machine_type", "section", "domain", "split", "label",
                                              "content_sha256"])
    plan = plan_split(keys, rep["split"]["derive_fraction"])
    assert plan.sha256() == rep["split"]["sha256"]
    return plan.table.column("clip_id").to_pylist(), plan.table.column("role").to_pylist()


@pytest.mark.slow
@pytest.mark.real_data
def test_job_on_real_roboticarm_clips(real_data, ray_session, tmp_path):
    """The real DCASE 2024 RoboticArm clips (39 train, 57 test, no target training clips)."""
    from jobs import evaluate as job

    os.environ.setdefault("ASD_REAL_DATA", str(real_data))
    cfg = _compose("data=roboticarm", f"root={tmp_path}/run", "recipes=[]", "ae.epochs=3", "ae.num_actors=1")
    assert cfg.data.input.endswith("dcase2024_roboticarm")
    out = job.run(cfg)
    with open(out["report_json"]) as f:
        rep = json.load(f)
    assert rep["data"]["clips"] == 96 and rep["split"]["derived"] == []
    assert rep["split"]["counts"]["RoboticArm"][TRAIN] == 39 and rep["split"]["counts"]["RoboticArm"][TEST] == 57
    assert any("No target-domain training clips for RoboticArm" in n for n in rep["notes"])
    assert all(v is not None and 0.0 < v < 1.0 for v in out["official_scores"].values())


@pytest.mark.slow
def test_finetuned_recipe_fine_tunes_in_the_run_on_pseudo_labels_of_the_training_split(ray_session, small_corpus,
                                                                                       tmp_path):
    """finetuned_ssl with a given pre-trained encoder (here untrained) instead of pre-training: it
    embeds the training split, Ward pseudo labels of that, fine-tuning on them, then kNN on the
    fine-tuned encoder."""
    from asd.models.encoder import AudioEncoder
    from asd.models.registry import load_checkpoint, save_checkpoint
    from jobs import evaluate as job

    start = str(tmp_path / "encoders" / "encoder.pt")
    save_checkpoint(AudioEncoder("tiny"), start, meta={})
    root = str(tmp_path / "run")
    cfg = _compose("data=dir", f"data.input={small_corpus}", f"root={root}", "recipes=[finetuned_ssl]", "baselines=[]",
                   recipe_overrides=["pretrain=null", f"encoder={start}", "models.finetune.train.steps=3",
                                     "models.finetune.train.num_workers=1", "models.finetune.train.crop_frames=64",
                                     "labels.cluster.n_clusters=3"])
    out = job.run(cfg)
    with open(out["report_json"]) as f:
        info = json.load(f)["methods"]["finetuned_ssl"]["info"]
    ft = info["models"]["finetune"]
    assert info["pretrained"] == start and ft["steps"] == 3 and ft["labels"] == f"{root}/labels/pretrained"
    assert ft["encoders"] == [f"{root}/models/finetune-ssl/encoder.pt"]
    encoder = load_checkpoint(ft["encoders"][0])
    assert encoder.meta["stage"] == "finetune" and encoder.meta["init_checkpoint"] == start
    labels = storage.read_table(f"{root}/labels/pretrained/labels.parquet")
    assert set(labels.column("clip_id").to_pylist()) == set(read_train_ids(root))  # the training split only
    assert ft["num_classes"] >= 3 and 0.0 <= out["official_scores"]["finetuned_ssl"] <= 1.0
    md = open(out["report_md"]).read()
    assert f"finetuned_ssl: pre-trained encoder `{start}`, trained outside this run" in md
    assert "finetune trained in this run for 3 steps on the training split's pseudo of pretrained labels" in md
    assert (f"Ward clusters of the pre-trained encoder's embeddings of the training clips (`{root}/labels/pretrained`), "
            "used by finetuned_ssl") in md


def read_train_ids(root):
    from asd.stores.features import read_features_table

    return read_features_table(f"{root}/evaluate/train_view", columns=["clip_id"]).column("clip_id").to_pylist()


@pytest.mark.slow
def test_cnn_recipes_train_from_scratch_on_their_labels_and_name_the_served_recipe(ray_session, small_corpus,
                                                                                   tmp_path):
    """cnn_section / cnn_domain / cnn_real_else_pseudo: labels of the training split only (none, the
    domain, or real attributes with Ward pseudo labels of log-mel statistics for the type without
    them), a CNN trained from scratch on them, kNN on its embeddings; report.json names the served recipe."""
    from asd.models.cnn import CNNEncoder
    from asd.models.registry import load_checkpoint
    from jobs import evaluate as job

    root = str(tmp_path / "run")
    cfg = _compose("data=dir", f"data.input={small_corpus}", f"root={root}", "recipe=cnn_real_else_pseudo",
                   "recipes=[cnn_section,cnn_domain,cnn_real_else_pseudo]", "baselines=[]", recipe_overrides=TINY_CNN)
    out = job.run(cfg)
    with open(out["report_json"]) as f:
        rep = json.load(f)
    assert rep["served_method"] == "cnn_real_else_pseudo"
    train_ids = set(read_train_ids(root))
    for recipe, folder in (("cnn_section", "section"), ("cnn_domain", "domain"),
                           ("cnn_real_else_pseudo", "logmel-real_else_pseudo")):
        info = rep["methods"][recipe]["info"]
        assert info["models"]["cnn"]["steps"] == 4 and info["labels"]["labels"] == f"{root}/labels/{folder}"
        assert isinstance(load_checkpoint(info["models"]["cnn"]["encoders"][0]), CNNEncoder)
        labels = storage.read_table(f"{root}/labels/{folder}/labels.parquet")
        assert set(labels.column("clip_id").to_pylist()) == train_ids
    sections = storage.read_table(f"{root}/labels/section/labels.parquet")
    assert sections.column("label").null_count == sections.num_rows  # type and section only
    domains = storage.read_table(f"{root}/labels/domain/labels.parquet").to_pylist()
    assert all(r["label"] == r["domain"] for r in domains) and {r["label"] for r in domains} == {"source", "target"}
    mixed = storage.read_table(f"{root}/labels/logmel-real_else_pseudo/labels.parquet").to_pylist()
    gear = {r["label"] for r in mixed if r["machine_type"] == "gearlike"}  # the type without attributes
    fan = {r["label"] for r in mixed if r["machine_type"] == "fanlike"}
    assert len(gear) == 2 and all("speed=" in str(v) for v in fan)
    info = rep["methods"]["cnn_real_else_pseudo"]["info"]
    assert info["labels"]["clustered"] == "logmel"
    assert info["models"]["cnn"]["num_classes"] == len({(r["machine_type"], r["label"]) for r in mixed})
    assert "(the pipeline's served recipe)" in open(out["report_md"]).read()


@pytest.mark.slow
def test_recipes_share_their_labels_and_models_and_fuse_at_the_score_level(ray_session, small_corpus, tmp_path):
    """cnn, mod and fused in one run: the labels, the log-mel CNN and the two modulation CNNs (one
    ensemble) are made once and shared; mod scores the first modulation CNN; fused's score is the
    weighted sum of its members' own kNN distances (each architecture weighs the same)."""
    import pyarrow.parquet as pq

    from asd.algorithms import knn
    from asd.models.modnet import ModEncoder
    from asd.models.registry import load_checkpoint
    from asd.recipes.evaluate import LOGMEL, clip_keys
    from asd.stores.embeddings import read_embeddings, vectors
    from jobs import evaluate as job

    root = str(tmp_path / "run")
    cfg = _compose("data=dir", f"data.input={small_corpus}", f"root={root}", "recipes=[cnn,mod,fused]", "baselines=[]",
                   recipe_overrides=TINY_CNN + TINY_MOD)
    out = job.run(cfg)
    with open(out["report_json"]) as f:
        rep = json.load(f)
    assert set(rep["official_scores"]) == {"cnn", "mod", "fused"}
    cnn, mod, fused = (rep["methods"][m]["info"] for m in ("cnn", "mod", "fused"))
    assert mod["labels"] == cnn["labels"] == fused["labels"] and mod["models"]["mod"]["steps"] == 4
    assert fused["models"] == {"cnn": cnn["models"]["cnn"], "mod": mod["models"]["mod"]}  # trained once each
    mods = mod["models"]["mod"]["encoders"]
    assert len(mods) == 2 and mods[1].endswith("/models/mod-m1/encoder.pt") and isinstance(load_checkpoint(mods[0]), ModEncoder)
    assert mod["params"]["checkpoint"] == mods[0] and mod["embedder"] == "encoder"  # the first member alone
    members = fused["params"]["members"]
    assert fused["embedder"] == "concat" and fused["params"]["fusion"] == "score"
    assert [m["params"]["checkpoint"] for m in members] == [cnn["models"]["cnn"]["encoders"][0], *mods]
    assert [m["weight"] for m in members] == [1.0, 0.5, 0.5]
    e = read_embeddings(fused["embeddings"])
    assert vectors(e).shape[1] == 16 + 8 + 8
    # score-level fusion: 1 x (log-mel CNN distance) + 1/2 x each modulation CNN's, each its own nearest neighbour
    plan = plan_split(clip_keys(root, {LOGMEL}))
    ids = e.column("clip_id").to_pylist()
    train = [i for i, c in enumerate(ids) if c in plan.train_ids]
    scores = pq.read_table(f"{rep['methods']['fused']['scores']}/scores.parquet").to_pylist()
    vec, mt, sec, dom = vectors(e), e.column("machine_type").to_pylist(), e.column("section").to_pylist(), \
        e.column("domain").to_pylist()
    row = scores[0]
    q = ids.index(row["clip_id"])
    same = [i for i in train if (mt[i], sec[i]) == (row["machine_type"], row["section"])]
    expect = 0.0
    for (a, b), w in (((0, 16), 1.0), ((16, 24), 0.5), ((24, 32), 0.5)):
        bank = knn.MemoryBank.build(vec[same, a:b], [dom[i] for i in same])
        expect += w * float(bank.score_parts(vec[q:q + 1, a:b])[0][0])
    assert row["score"] == pytest.approx(expect, rel=1e-4)
    md = open(out["report_md"]).read()
    assert "mod: mod trained in this run for 4 steps" in md and "trained outside" not in md
    assert "2 models side by side in one run" in md
    assert (f"Ward clusters of log-mel statistics of the training clips (`{cnn['labels']['labels']}`), used by "
            "cnn, mod, fused:") in md
    assert md.count("## Pseudo labels against the real attributes") == 1


def test_pseudo_label_sets_lists_each_labelling_once_with_the_methods_that_trained_on_it():
    from asd.recipes.report import _pseudo_label_markdown, pseudo_label_sets

    q = {"fan": {"ari": 0.5, "nmi": 0.25, "n_clips": 10, "n_pseudo_classes": 2, "n_real_classes": 3}}
    logmel = {"labels": "r/labels/logmel", "source": "pseudo", "clustered": "logmel", "quality": q}
    per_method = {
        "logmel": {"info": {}},
        "finetuned_ssl": {"info": {"labels": {"labels": "r/labels/pretrained", "source": "pseudo",
                                              "clustered": "pretrained", "quality": q}}},
        "cnn": {"info": {"labels": logmel}},
        "cnn_section": {"info": {"labels": {"labels": "r/labels/section", "source": "section", "clustered": None}}},
        "fused": {"info": {"labels": dict(logmel)}},
    }
    sets = pseudo_label_sets(per_method)
    assert [(s["labels"], s["clustered"], s["methods"]) for s in sets] == [
        ("r/labels/pretrained", "pretrained", ["finetuned_ssl"]),
        ("r/labels/logmel", "logmel", ["cnn", "fused"])]
    md = "\n".join(_pseudo_label_markdown(per_method))
    assert md.count("| fan | 10 | 2 | 3 | 0.500 | 0.250 |") == 2
    assert _pseudo_label_markdown({"logmel": {"info": {}}}) == []
