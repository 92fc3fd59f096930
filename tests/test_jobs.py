"""The Hydra entry points as a user runs them: one stage at a time, against moto S3."""

import json
import os
import subprocess
import sys

import pytest

from asd.data.manifest import build_manifest
from asd.io import storage


def _job(module, *overrides, tmp_path, timeout=600):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", ASD_HYDRA_DIR=str(tmp_path / "hydra"))
    out = subprocess.run([sys.executable, "-m", module, "ray.num_cpus=2", "ray.progress=false", *overrides],
                         env=env, capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.s3
@pytest.mark.slow
def test_stage_jobs_on_s3(tmp_path, s3_bucket):
    spec = ["data.spec.n_train_source=6", "data.spec.n_train_target=2", "data.spec.n_test_per_domain=4",
            "data.spec.duration_s=1.0"]
    made = _job("jobs.make_corpus", "data=synthetic", f"out={s3_bucket}/corpus", *spec, tmp_path=tmp_path)
    assert made["n_clips"] == 4 * (6 + 2 + 8)
    assert build_manifest(f"{s3_bucket}/corpus", probe=False).table.num_rows == made["n_clips"]
    feat = _job("jobs.featurize", f"input={s3_bucket}/corpus", f"output={s3_bucket}/run", tmp_path=tmp_path)
    assert feat["n_featurized"] == made["n_clips"] and feat["features"] == f"{s3_bucket}/run/features"
    emb = _job("jobs.embed", f"root={s3_bucket}/run", "recipe=logmel", tmp_path=tmp_path)
    assert storage.is_published(emb["embeddings"]) and emb["embedder"] == "logmel_stats"
    assert storage.read_table(emb["embeddings"], columns=["clip_id"]).num_rows == made["n_clips"]
    labels = _job("jobs.pseudo_label", f"root={s3_bucket}/run", "recipe=cnn", tmp_path=tmp_path)
    assert labels["n_clips"] == 4 * (6 + 2) and labels["labels"] == f"{s3_bucket}/run/labels/logmel"
    assert set(labels["quality"]) == {"fanlike", "pumplike", "sliderlike"}  # the types with real attributes
    # the reported agreement is the one of the published labels (recomputed here)
    from sklearn.metrics import adjusted_rand_score

    rows = storage.read_table(f"{labels['labels']}/labels.parquet").to_pylist()
    for t, q in labels["quality"].items():
        mine = [r for r in rows if r["machine_type"] == t]
        assert q["n_clips"] == len(mine) == 6 + 2 and q["n_real_classes"] >= 2
        assert q["ari"] == pytest.approx(adjusted_rand_score([r["real_label"] for r in mine],
                                                             [r["pseudo_label"] for r in mine]))
    assert storage.is_published(labels["labels"]) and storage.exists(f"{labels['labels']}/dendrogram_fanlike.png")
    sc = _job("jobs.score", f"root={s3_bucket}/run", "recipe=logmel", "score.k=2", tmp_path=tmp_path)
    assert sc["n_scored"] == 4 * 8 and sc["scores"] == f"{s3_bucket}/run/scores/logmel"
    assert "official score" in storage.read_text(sc["report"])
    assert not (tmp_path / "outputs" / "default").exists()  # nothing went to the local default root


def test_unknown_config_key_is_refused(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", ASD_HYDRA_DIR=str(tmp_path / "hydra"))

    def job(override):
        return subprocess.run([sys.executable, "-m", "jobs.score", override], env=env, capture_output=True,
                              text=True, timeout=300, cwd=str(tmp_path))

    out = job("score.kk=3")  # the schema (jobs.schema) knows every key: Hydra refuses at composition
    assert out.returncode != 0 and "Key 'kk' not in 'ScoreConfig'" in out.stderr
    out = job("+score.kk=3")  # forced in with '+': the stage's dataclass refuses it before anything runs
    assert out.returncode != 0 and "unknown keys for ScoreConfig: ['kk']" in out.stderr


def test_storage_locations_are_validated():
    from jobs.common import check_paths

    assert storage.validate_uri("s3://bucket/runs/r1") == "s3://bucket/runs/r1"
    assert storage.validate_uri("../shared/data/real", allow_parent=True)
    for bad in ["http://example.com/x", "s3:///nobucket", "./outputs/../../etc", "", "a\nb"]:
        with pytest.raises(ValueError):
            storage.validate_uri(bad)
    assert storage.is_within("s3://b/run", "s3://b/run/checkpoints") and not storage.is_within("s3://b/run", "s3://b/runx")
    assert not storage.is_within("s3://b/run", "s3://other/run/x") and storage.is_within("./out", "out/ckpt")
    check_paths({"root": "s3://b/run", "data": {"input": "../corpus"},
                 "pretrain": {"train": {"storage_path": "s3://b/run/checkpoints"}}})
    with pytest.raises(ValueError, match="outside the run's storage root"):
        check_paths({"root": "s3://b/run", "pretrain": {"train": {"storage_path": "s3://b/elsewhere"}}})
    check_paths({"root": "./outputs/default", "input": "s3://b/corpus", "output": "s3://b/run"})  # featurize's root
    with pytest.raises(ValueError, match="'..' is not allowed"):
        check_paths({"root": "./outputs/default", "output": "s3://b/run/../other"})
    with pytest.raises(ValueError, match="'..' is not allowed"):
        check_paths({"root": "./outputs/../../tmp/x"})
    with pytest.raises(ValueError, match="unsupported scheme"):
        check_paths({"root": "./outputs/r", "finetune": {"init_checkpoint": "http://host/model.pt"}})


def test_a_job_writing_outside_its_root_is_refused_before_it_starts(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", ASD_HYDRA_DIR=str(tmp_path / "hydra"))
    out = subprocess.run([sys.executable, "-m", "jobs.pretrain", f"root={tmp_path}/run", "recipe=pretrained",
                          f"recipe.pretrain.train.storage_path={tmp_path}/elsewhere"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode != 0 and "outside the run's storage root" in out.stderr
    assert "Started a local Ray instance" not in out.stderr and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("module", ["jobs.pipeline", "jobs.evaluate", "jobs.featurize", "jobs.make_corpus"])
def test_a_path_given_as_data_says_what_to_write(tmp_path, module):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", ASD_HYDRA_DIR=str(tmp_path / "hydra"))
    out = subprocess.run([sys.executable, "-m", module, "data=/path/to/corpus"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode != 0
    assert "write input=/path/to/corpus (the same as data=dir data.input=/path/to/corpus)" in out.stderr
    assert "Could not find" not in out.stderr and "Started a local Ray instance" not in out.stderr


def test_input_is_short_for_data_dir():
    from omegaconf import OmegaConf

    from jobs.common import apply_input, refuse_path_as_data

    cfg = OmegaConf.create({"input": "s3://b/corpus", "data": {"input": "./outputs/x/corpus", "generate": True,
                                                                "spec": {"seed": 0}}})
    apply_input(cfg)
    assert OmegaConf.to_container(cfg.data) == {"input": "s3://b/corpus", "generate": False}
    assert cfg.input == "s3://b/corpus"
    plain = apply_input(OmegaConf.create({"input": None, "data": {"input": "./c", "generate": True}}))
    assert plain.input == "./c" and plain.data.generate  # no input=: the data group decides
    assert apply_input(plain).data.generate and apply_input(cfg).input == "s3://b/corpus"  # applying twice: same
    # input= naming the generating data config's own path still reads it, never regenerates over it
    same = OmegaConf.create({"root": "/r", "input": "/r/corpus",
                             "data": {"input": "${root}/corpus", "generate": True, "spec": {"seed": 0}}})
    assert OmegaConf.to_container(apply_input(same).data) == {"input": "/r/corpus", "generate": False}
    assert OmegaConf.to_container(apply_input(same).data) == {"input": "/r/corpus", "generate": False}
    refuse_path_as_data(["data=dir", "data=roboticarm", "data.input=/x", "input=/x"])  # all fine
    for bad in ["data=../corpus", "data=s3://b/c", "+data=./c", "data=C:\\corpus"]:
        with pytest.raises(SystemExit, match="write input="):
            refuse_path_as_data([bad])


@pytest.mark.slow
def test_pipeline_and_featurize_read_a_corpus_named_by_input(tmp_path, small_corpus):
    feat = _job("jobs.featurize", f"input={small_corpus}", f"output={tmp_path}/feat", tmp_path=tmp_path)
    assert feat["n_featurized"] > 0 and feat["features"] == f"{tmp_path}/feat/features"
    final = _job("jobs.pipeline", f"input={small_corpus}", f"root={tmp_path}/run",
                 "stages=[featurize,embed,score]", "recipe=logmel", "compare=[]", tmp_path=tmp_path)
    assert final["stages"]["featurize"]["n_featurized"] == feat["n_featurized"]
    assert "make_corpus" not in final["stages"] and not (tmp_path / "run" / "corpus").exists()
    assert final["served"]["recipe"] == "logmel" and 0 <= final["official_score"] <= 1


@pytest.mark.real_data
@pytest.mark.slow
def test_evaluate_reads_the_real_clips_named_by_input(tmp_path, real_data):
    final = _job("jobs.evaluate", f"input={real_data}/dcase2024_roboticarm", f"root={tmp_path}/run",
                 "recipes=[logmel]", "baselines=[]", "plots=false", tmp_path=tmp_path)
    assert set(final["official_scores"]) == {"logmel"} and 0 <= final["official_scores"]["logmel"] <= 1
    report = json.load(open(final["report_json"]))
    assert report["data"]["input"] == f"{real_data}/dcase2024_roboticarm" and report["data"]["clips"] == 39 + 57


def test_ray_data_defaults_size_footer_readers_to_the_cluster_and_keep_a_users_value(monkeypatch):
    from jobs.common import FOOTER_ACTORS_ENV, ray_data_defaults

    for cpus, expected in ((1, "2"), (8, "8"), (500, "32")):
        monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
        ray_data_defaults(cpus=cpus)
        assert os.environ[FOOTER_ACTORS_ENV] == expected
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "5")
    ray_data_defaults(cpus=64)
    assert os.environ[FOOTER_ACTORS_ENV] == "5"
