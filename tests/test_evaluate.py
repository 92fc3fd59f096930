"""The evaluation run (asd.evaluate, jobs.evaluate): the split rule, checksums, method registry and
prerequisites without Ray; the job end to end on a tiny generated corpus; the real RoboticArm data."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pytest

from asd import storage
from asd.evaluate import EvaluateConfig, MethodUnavailable, evaluate, get_method
from asd.split import EXCLUDED, TEST, TRAIN, data_sha256, plan_split


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


def test_unknown_method_and_missing_prerequisites_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'svm'"):
        get_method("svm")
    cfg = EvaluateConfig(methods=("logmel_knn", "finetuned_knn"))
    cfg.finetuned.checkpoint = str(tmp_path / "missing_finetuned.pt")
    with pytest.raises(MethodUnavailable, match="finetuned.checkpoint .* does not exist"):
        evaluate(str(tmp_path / "nowhere"), str(tmp_path / "root"), cfg)
    cfg = EvaluateConfig(methods=("finetuned_knn",))  # fine-tuning in the run starts from pretrained.checkpoint
    cfg.pretrained.checkpoint = str(tmp_path / "missing_pretrained.pt")
    with pytest.raises(MethodUnavailable, match="pretrained.checkpoint .* does not exist"):
        evaluate(str(tmp_path / "nowhere"), str(tmp_path / "root"), cfg)
    cfg = EvaluateConfig(methods=("pretrained_knn",))
    cfg.pretrained.checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(MethodUnavailable, match="does not exist"):
        evaluate(str(tmp_path / "nowhere"), str(tmp_path / "root"), cfg)
    assert not (tmp_path / "root").exists()


# ----------------------------------------------------------------------------- the job


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from jobs import evaluate as job

    conf = os.path.join(os.path.dirname(job.__file__), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose("evaluate", overrides=["ray.progress=false", *overrides])


@pytest.mark.slow
def test_job_on_a_test_only_corpus_writes_the_report_with_every_method(ray_session, tmp_path, monkeypatch):
    """A corpus without train folders: the split is derived from normal test clips, every method
    trains or banks on it and nothing of it is scored; md/json/png carry all five methods. The
    encoder pre-training is stubbed (it is Ray Train like the autoencoder, tested in
    test_pretrain.py): the stub checks it would train on exactly the split's training clips."""
    import asd.pretrain
    from asd.data.synthetic import MachineSpec, default_spec, make_corpus
    from asd.features import read_features_table
    from asd.models.encoder import AudioEncoder, save_checkpoint
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
        return asd.pretrain.PretrainResult(checkpoint=None, run="", encoder=encoder, current=None, final_loss=0.5,
                                           steps=tcfg.steps, start_step=0, seconds=0.0, samples_per_s=0.0)

    monkeypatch.setattr(asd.pretrain, "pretrain", fake_pretrain)
    root = str(tmp_path / "run")
    cfg = _compose("data=dir", f"data.input={corpus}", f"root={root}", f"report_to={tmp_path}/copy/evaluate_test",
                   "methods=[ae_mse,ae_mahalanobis,logmel_knn,pretrained_knn,finetuned_knn,cnn_section]",
                   f"finetuned.checkpoint={encoder}", "ae.train.steps=30", "ae.num_actors=1",
                   "pretrained.pretrain.train.steps=2", "pretrained.embed.num_actors=1",
                   "finetuned.embed.num_actors=1", "logmel.embed.num_actors=1", "score.concurrency=1", "plots=false")
    out = job.run(cfg)
    methods = ["ae_mse", "ae_mahalanobis", "logmel_knn", "pretrained_knn", "finetuned_knn"]
    assert sorted(out["official_scores"]) == sorted(methods)
    for ext in ("md", "json", "png"):
        assert os.path.getsize(f"{root}/evaluate/report.{ext}") > 0
        assert os.path.getsize(f"{tmp_path}/copy/evaluate_test.{ext}") > 0
    with open(f"{root}/evaluate/report.json") as f:
        rep = json.load(f)
    assert rep["split"]["derived"][0]["train_clips"] == {"source": 2, "target": 2}  # floor(4 normals * 0.5)
    assert len(rep["data"]["sha256"]) == 64 and rep["data"]["clips"] == 16
    assert rep["config"]["job"]["methods"] == methods + ["cnn_section"]
    assert rep["methods"]["pretrained_knn"]["info"]["pretrain"]["steps"] == 2
    # one type with one section: section labels give one class, so cnn_section cannot train; the
    # report says so and the other methods are still reported
    assert list(rep["not_run"]) == ["cnn_section"] and "only one class" in rep["not_run"]["cnn_section"]
    assert "cnn_section" not in rep["methods"] and "cnn_section" not in rep["official_scores"]
    with open(f"{root}/evaluate/report.md") as f:
        md = f.read()
    assert "has no train split" in md and all(f"| {m} |" in md for m in methods)
    assert "| cnn_section | – |" in md and "not run: " in md
    assert "Autoencoder baseline: one model per machine type" in md and "ae_mse: encoder" not in md
    train = {c for c, r in zip(*_split_rows(rep)) if r == TRAIN}
    assert len(train) == 4 and all("_normal_" in c for c in train)
    # the encoder would be pre-trained on a feature view of exactly the training clips
    assert pretrained_on["root"] == f"{root}/evaluate/train_view" and pretrained_on["tag"] == "eval-pretrain"
    assert {r["clip_id"] for r in pretrained_on["rows"]} == train
    assert {r["split"] for r in pretrained_on["rows"]} == {"train"}
    ae_view = read_features_table(f"{root}/baselines/ae/train_view", columns=["clip_id"]).column("clip_id")
    assert set(ae_view.to_pylist()) == train  # and so is the autoencoder
    for m in methods:
        scored = storage.read_table(f"{root}/scores/{m}/scores.parquet").column("clip_id").to_pylist()
        assert len(scored) == 12 and not train & set(scored)
    assert all(0.0 <= v <= 1.0 for v in rep["official_scores"].values() if v is not None)


def _split_rows(rep):
    from asd.features import read_features_table

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
    cfg = _compose("data=roboticarm", f"root={tmp_path}/run", "methods=[ae_mse,ae_mahalanobis]",
                   "ae.train.steps=20", "ae.num_actors=1", "plots=false")
    assert cfg.data.input.endswith("dcase2024_roboticarm")
    out = job.run(cfg)
    with open(out["report_json"]) as f:
        rep = json.load(f)
    assert rep["data"]["clips"] == 96 and rep["split"]["derived"] == []
    assert rep["split"]["counts"]["RoboticArm"][TRAIN] == 39 and rep["split"]["counts"]["RoboticArm"][TEST] == 57
    assert any("No target-domain training clips for RoboticArm" in n for n in rep["notes"])
    assert all(v is not None and 0.0 < v < 1.0 for v in out["official_scores"].values())


@pytest.mark.slow
def test_finetuned_knn_fine_tunes_in_the_run_on_pseudo_labels_of_the_training_split(ray_session, small_corpus,
                                                                                     tmp_path):
    """finetuned_knn without a checkpoint: the pre-trained encoder (here given, untrained) embeds the
    training split, Ward pseudo labels, fine-tuning on them, then kNN on the fine-tuned encoder."""
    from asd.models.encoder import AudioEncoder, load_checkpoint, save_checkpoint
    from jobs import evaluate as job

    start = str(tmp_path / "encoders" / "encoder.pt")
    save_checkpoint(AudioEncoder("tiny"), start, meta={})
    root = str(tmp_path / "run")
    cfg = _compose("data=dir", f"data.input={small_corpus}", f"root={root}", "methods=[finetuned_knn]",
                   f"pretrained.checkpoint={start}", "pretrained.embed.num_actors=1", "finetuned.embed.num_actors=1",
                   "finetuned.finetune.train.steps=3", "finetuned.finetune.train.num_workers=1",
                   "finetuned.finetune.train.crop_frames=64", "finetuned.cluster.n_clusters=3",
                   "score.concurrency=1", "plots=false")
    out = job.run(cfg)
    with open(out["report_json"]) as f:
        info = json.load(f)["methods"]["finetuned_knn"]["info"]
    ft = info["finetune"]
    assert ft["from"] == start and ft["steps"] == 3 and ft["labels"] == f"{root}/labels/eval-finetune"
    assert info["checkpoint"] == ft["encoder"] == f"{root}/models/eval-finetune/encoder.pt"
    assert load_checkpoint(ft["encoder"]).meta["stage"] == "finetune"
    labels = storage.read_table(f"{root}/labels/eval-finetune/labels.parquet")
    train_ids = set(read_train_ids(root))
    assert set(labels.column("clip_id").to_pylist()) == train_ids  # pseudo labels of the training split only
    assert ft["num_classes"] >= 3 and 0.0 <= out["official_scores"]["finetuned_knn"] <= 1.0
    md = open(out["report_md"]).read()
    assert "finetuned_knn: encoder fine-tuned in this run for 3 steps" in md and "trained outside" not in md
    assert (f"Ward clusters of the pre-trained encoder's embeddings of the training clips (`{root}/labels/eval-finetune`), "
            "used by finetuned_knn") in md


def read_train_ids(root):
    from asd.features import read_features_table

    return read_features_table(f"{root}/evaluate/train_view", columns=["clip_id"]).column("clip_id").to_pylist()


@pytest.mark.slow
def test_cnn_methods_train_from_scratch_on_their_labels_and_name_the_served_recipe(ray_session, small_corpus,
                                                                                 tmp_path):
    """cnn_section / cnn_real_else_pseudo: labels of the training split only (none, or real attributes with
    Ward pseudo labels of log-mel statistics for the type without them), a CNN trained from scratch on
    them, kNN on its embeddings; report.json names the served method."""
    from asd.models.cnn import CNNEncoder
    from asd.models.encoder import load_checkpoint
    from jobs import evaluate as job

    root = str(tmp_path / "run")
    cfg = _compose("data=dir", f"data.input={small_corpus}", f"root={root}",
                   "methods=[cnn_section,cnn_real_else_pseudo]", "served_method=cnn_real_else_pseudo",
                   "cnn.finetune.model_cfg.channels=[4,8,8]", "cnn.finetune.model_cfg.embed_dim=16",
                   "cnn.finetune.train.steps=4", "cnn.finetune.train.crop_frames=64", "cnn.finetune.train.batch_size=8",
                   "cnn.finetune.train.cpus_per_worker=0.5", "cnn.finetune.train.torch_threads=1",
                   "cnn.embed.num_actors=1", "logmel.embed.num_actors=1", "cnn.cluster.n_clusters=2",
                   "score.concurrency=1", "plots=false")
    out = job.run(cfg)
    with open(out["report_json"]) as f:
        rep = json.load(f)
    assert rep["served_method"] == "cnn_real_else_pseudo"
    train_ids = set(read_train_ids(root))
    for mode in ("section", "real_else_pseudo"):
        info = rep["methods"][f"cnn_{mode}"]["info"]["training"]
        assert info["steps"] == 4 and info["label_mode"] == mode
        assert isinstance(load_checkpoint(info["encoder"]), CNNEncoder)
        labels = storage.read_table(f"{root}/labels/eval-cnn-{mode}/labels.parquet")
        assert set(labels.column("clip_id").to_pylist()) == train_ids
    sections = storage.read_table(f"{root}/labels/eval-cnn-section/labels.parquet")
    assert sections.column("label").null_count == sections.num_rows  # type and section only
    mixed = storage.read_table(f"{root}/labels/eval-cnn-real_else_pseudo/labels.parquet").to_pylist()
    gear = {r["label"] for r in mixed if r["machine_type"] == "gearlike"}  # the type without attributes
    fan = {r["label"] for r in mixed if r["machine_type"] == "fanlike"}
    assert len(gear) == 2 and all("speed=" in str(v) for v in fan)
    info = rep["methods"]["cnn_real_else_pseudo"]["info"]["training"]
    assert info["clustered"] == "logmel" and info["num_classes"] == len({(r["machine_type"], r["label"]) for r in mixed})
    assert "(the pipeline's served recipe)" in open(out["report_md"]).read()


@pytest.mark.slow
def test_mod_and_fused_methods_share_the_pseudo_labels_and_the_trained_encoders(ray_session, small_corpus, tmp_path):
    """mod_pseudo trains the modulation CNNs (two members in one run) on cnn_pseudo's labels and scores
    the first; fused_pseudo fuses the log-mel CNN and both modulation CNNs at the score level without
    training any of them again; its scores are the weighted sums of the members' own kNN distances."""
    from asd.embeddings import read_embeddings, vectors
    from asd.models.encoder import load_checkpoint
    from asd.models.modnet import ModEncoder
    from jobs import evaluate as job

    root = str(tmp_path / "run")
    cfg = _compose("data=dir", f"data.input={small_corpus}", f"root={root}",
                   "methods=[cnn_pseudo,mod_pseudo,fused_pseudo]",
                   "cnn.finetune.model_cfg.channels=[4,8,8]", "cnn.finetune.model_cfg.embed_dim=16",
                   "cnn.finetune.train.steps=4", "cnn.finetune.train.crop_frames=64", "cnn.finetune.train.batch_size=8",
                   "cnn.finetune.train.cpus_per_worker=0.5", "cnn.finetune.train.torch_threads=1",
                   "mod.finetune.model_cfg.channels=[8,8]", "mod.finetune.model_cfg.pooled=4",
                   "mod.finetune.model_cfg.embed_dim=8", "mod.finetune.train.steps=4",
                   "mod.finetune.train.batch_size=8", "mod.finetune.train.cpus_per_worker=0.5",
                   "mod.finetune.train.torch_threads=1", "cnn.embed.num_actors=1", "mod.embed.num_actors=1",
                   "logmel.embed.num_actors=1", "cnn.cluster.n_clusters=2", "score.concurrency=1", "plots=false",
                   "mod.finetune.members=2")
    out = job.run(cfg)
    with open(out["report_json"]) as f:
        rep = json.load(f)
    assert set(rep["official_scores"]) == {"cnn_pseudo", "mod_pseudo", "fused_pseudo"}
    cnn_info = rep["methods"]["cnn_pseudo"]["info"]["training"]
    mod_info = rep["methods"]["mod_pseudo"]["info"]["training"]
    assert mod_info["labels"] == cnn_info["labels"] and mod_info["steps"] == 4
    assert isinstance(load_checkpoint(mod_info["encoder"]), ModEncoder)
    fused = rep["methods"]["fused_pseudo"]["info"]
    assert fused["fusion"] == "score" and len(fused["members"]) == 3
    assert fused["members"][:2] == [cnn_info["encoder"], mod_info["encoder"]]  # the same two models, not retrained
    assert fused["training"]["mod"] == mod_info and fused["training"]["cnn"] == cnn_info  # one run per architecture
    assert mod_info["encoders"] == fused["members"][1:] and fused["members"][2].endswith("eval-mod-pseudo-m1/encoder.pt")
    e = read_embeddings(fused["embeddings"])
    assert vectors(e).shape[1] == 16 + 8 + 8
    # score-level fusion: 1 x (log-mel CNN distance) + 1/2 x each modulation CNN's, each its own nearest neighbour
    import pyarrow.parquet as pq

    from asd import knn
    from asd.evaluate import LOGMEL, _clip_keys
    from asd.split import plan_split

    plan = plan_split(_clip_keys(root, {LOGMEL}))
    ids = e.column("clip_id").to_pylist()
    train = [i for i, c in enumerate(ids) if c in plan.train_ids]
    scores = pq.read_table(f"{rep['methods']['fused_pseudo']['scores']}/scores.parquet").to_pylist()
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
    assert "mod_pseudo: encoder trained from scratch in this run for 4 steps" in md and "trained outside" not in md
    assert "2 models side by side in one run" in md
    assert (f"Ward clusters of log-mel statistics of the training clips (`{cnn_info['labels']}`), used by "
            "cnn_pseudo, mod_pseudo, fused_pseudo:") in md
    assert md.count("## Pseudo labels against the real attributes") == 1


def test_pseudo_label_sets_lists_each_labelling_once_with_the_methods_that_trained_on_it():
    from asd.evaluate import _pseudo_label_markdown, pseudo_label_sets

    q = {"fan": {"ari": 0.5, "nmi": 0.25, "n_clips": 10, "n_pseudo_classes": 2, "n_real_classes": 3}}
    cnn = {"labels": "r/labels/eval-cnn-pseudo", "clustered": "logmel", "pseudo_label_quality": q, "steps": 5}
    per_method = {
        "logmel_knn": {"info": {}},
        "finetuned_knn": {"info": {"finetune": {"labels": "r/labels/eval-finetune", "pseudo_label_quality": q}}},
        "cnn_pseudo": {"info": {"training": cnn}},
        "cnn_section": {"info": {"training": {"labels": "r/labels/eval-cnn-section", "steps": 5}}},  # not clustered
        "fused_pseudo": {"info": {"training": {"cnn": cnn, "mod": dict(cnn)}}},
    }
    sets = pseudo_label_sets(per_method)
    assert [(s["labels"], s["clustered"], s["methods"]) for s in sets] == [
        ("r/labels/eval-finetune", "pretrained", ["finetuned_knn"]),
        ("r/labels/eval-cnn-pseudo", "logmel", ["cnn_pseudo", "fused_pseudo"])]
    md = "\n".join(_pseudo_label_markdown(per_method))
    assert md.count("| fan | 10 | 2 | 3 | 0.500 | 0.250 |") == 2
    assert _pseudo_label_markdown({"logmel_knn": {"info": {}}}) == []
