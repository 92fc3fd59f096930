"""A detector is a recipe (asd.recipes): one YAML file that the pipeline, evaluate and the stage jobs all
run through one wiring (asd.recipes.run.RecipeRun). Fusion weights, folder names and sharing are
derived from the recipe; a new recipe is one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

from asd.recipes.recipe import EmbedEntry, Labels, Model, Recipe, embedder, members
from asd.recipes.run import RecipeConflict, RecipeRun, Split
from asd.stages.finetune import FinetuneConfig


def test_an_ensemble_shares_its_entrys_weight_and_each_architecture_counts_once():
    recipe = Recipe(name="r", labels=Labels(), embed=[EmbedEntry(source="a"), EmbedEntry(source="b", weight=2.0)],
                    models={"a": Model(FinetuneConfig(tag="a", model="cnn")),
                            "b": Model(FinetuneConfig(tag="b", model="mod", members=4))})
    out = members(recipe, {"a": ["a.pt"], "b": [f"b{i}.pt" for i in range(4)]}, None)
    assert [m["weight"] for m in out] == [1.0, 0.5, 0.5, 0.5, 0.5]
    assert [m["params"]["checkpoint"] for m in out] == ["a.pt", "b0.pt", "b1.pt", "b2.pt", "b3.pt"]
    assert all(m["params"]["pool"] == "mean" for m in out)  # the pooling a model's head was trained on
    name, params = embedder(out, recipe.fusion)
    assert name == "concat" and params["fusion"] == "score" and params["members"] == out
    first = Recipe(name="f", labels=Labels(), models=recipe.models, embed=[EmbedEntry(source="b", members=1)])
    one = members(first, {"b": ["b0.pt", "b1.pt"]}, None)
    assert embedder(one) == ("encoder", one[0]["params"]) and one[0]["params"]["checkpoint"] == "b0.pt"
    logmel, = members(Recipe(name="l"), {}, None)
    assert embedder([logmel]) == ("logmel_stats", {"deltas": False})
    pre, = members(Recipe(name="p", encoder="e.pt", embed=[EmbedEntry(source="pretrained")]), {}, "e.pt")
    assert pre["params"]["pool"] == "freq_meanstd" and pre["params"]["checkpoint"] == "e.pt"


def test_a_recipe_that_cannot_work_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="neither logmel, spectrum, pretrained nor one of its models"):
        Recipe(name="r", embed=[EmbedEntry(source="cnn")])
    with pytest.raises(ValueError, match="models need labels"):
        Recipe(name="r", models={"cnn": Model(FinetuneConfig(model="cnn"))}, embed=[EmbedEntry(source="cnn")])
    with pytest.raises(ValueError, match="needs a pre-trained encoder"):
        Recipe(name="r", embed=[EmbedEntry(source="pretrained")])
    with pytest.raises(ValueError, match="needs a pre-trained encoder"):  # a transformer fine-tuned from nothing
        Recipe(name="r", labels=Labels(), models={"t": Model(FinetuneConfig(tag="t"))}, embed=[EmbedEntry(source="t")])
    with pytest.raises(ValueError, match="labels.source"):
        Labels(source="attributes")
    assert [Labels(source=s).tag_name() for s in ("pseudo", "real_else_pseudo", "section", "real")] == [
        "logmel", "logmel-real_else_pseudo", "section", "real"]
    assert Labels(clustered="pretrained").tag_name() == "pretrained" and Labels(tag="mine").tag_name() == "mine"


def _recording(monkeypatch):
    """The stage functions a RecipeRun calls, recorded instead of run."""
    import asd.stages.embed as E
    import asd.stages.finetune as F
    import asd.stages.pseudo_label as L

    calls = []

    def finetune(features, root, fcfg, tcfg):
        calls.append(("finetune", fcfg.tag))
        encoders = [f"{root}/models/{fcfg.tag}{'-m%d' % i if i else ''}/encoder.pt" for i in range(fcfg.members)]
        return types.SimpleNamespace(encoders=encoders, steps=tcfg.steps, start_step=0, num_classes=2,
                                     final_accuracy=1.0, seconds=0.0)

    monkeypatch.setattr(F, "finetune", finetune)
    monkeypatch.setattr(E, "embed", lambda root, tag, cfg: calls.append(("embed", tag)) or types.SimpleNamespace(
        embeddings=f"{root}/embeddings/{tag}"))
    monkeypatch.setattr(L, "pseudo_label", lambda emb, out, cfg, **k: calls.append(("labels", out)) or
                        types.SimpleNamespace(quality={}, n_clips=0))
    return calls


def test_what_recipes_share_is_made_once_and_a_conflict_is_named(monkeypatch, tmp_path):
    from jobs.common import compose_config, compose_recipes

    calls = _recording(monkeypatch)
    recipes = compose_recipes(compose_config("pipeline"), ["fused", "cnn", "mod", "logmel"])
    run = RecipeRun(str(tmp_path), Split(str(tmp_path)), stages=("pseudo_label", "finetune", "embed"))
    for r in recipes.values():
        run.run(r, steps=("pseudo_label", "finetune", "embed"))
    assert calls.count(("finetune", "cnn")) == calls.count(("finetune", "mod")) == 1
    assert [c for c in calls if c[0] == "labels"] == [("labels", f"{tmp_path}/labels/logmel")]
    assert calls.count(("embed", "logmel")) == 1  # clustered for the labels, then scored as the logmel recipe
    assert {c[1] for c in calls if c[0] == "embed"} == {"logmel", "fused", "cnn", "mod"}
    assert run.results["mod"].models["mod"] == run.results["fused"].models["mod"]
    # the same model folder with other settings: an error naming both recipes, not a silent reuse
    other = compose_recipes(compose_config("pipeline"), ["cnn"], overrides=["models.cnn.train.steps=7"])["cnn"]
    with pytest.raises(RecipeConflict, match="model 'cnn' is defined by recipes 'fused' and 'cnn'"):
        run.run(other, steps=("finetune",))


def test_a_later_step_alone_reads_what_the_earlier_steps_published(monkeypatch, tmp_path):
    from asd.io import storage
    from jobs.common import compose_config, compose_recipes

    _recording(monkeypatch)
    recipe = compose_recipes(compose_config("pipeline"), ["cnn"])["cnn"]
    with pytest.raises(FileNotFoundError, match="labels/logmel' is not a published stage output"):
        RecipeRun(str(tmp_path), Split(str(tmp_path)), stages=("embed",)).run(recipe, steps=("embed",))
    storage.publish(f"{tmp_path}/labels/logmel")
    with pytest.raises(FileNotFoundError, match="models/cnn/encoder.pt' does not exist; run the finetune stage first"):
        RecipeRun(str(tmp_path), Split(str(tmp_path)), stages=("embed",)).run(recipe, steps=("embed",))
    storage.atomic_write_bytes(f"{tmp_path}/models/cnn/encoder.pt", b"x")
    uri = RecipeRun(str(tmp_path), Split(str(tmp_path)), stages=("embed",)).run(recipe, steps=("embed",)).embeddings
    assert uri == f"{tmp_path}/embeddings/cnn"


def _job(args, tmp_path, timeout=900) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", ASD_HYDRA_DIR=str(tmp_path / "hydra"), TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, "-m", *args, "ray.num_cpus=2", "ray.progress=false", "embed.num_actors=1",
                          "score.concurrency=1"], env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_new_recipe_is_one_yaml_file_that_the_pipeline_serves_and_evaluate_compares(tmp_path, small_corpus):
    """The log-mel CNN alone, as a recipe of one's own (in a folder of one's own, --config-dir):
    ``jobs.pipeline recipe=<it>`` trains, scores and serves it; ``jobs.evaluate recipes=[<it>, ...]``
    runs it beside another recipe on one split."""
    conf = tmp_path / "my_conf"
    (conf / "recipe").mkdir(parents=True)
    (conf / "recipe" / "cnn_alone.yaml").write_text(textwrap.dedent("""\
        # The served recipe's log-mel CNN alone, smaller.
        defaults:
          - cnn
          - _self_
        name: cnn_alone
        labels:
          cluster: {n_clusters: 2}
        models:
          cnn:
            tag: cnn-alone
            model_cfg: {channels: [4, 8, 8], embed_dim: 16}
            train: {steps: 4, crop_frames: 64, batch_size: 8, cpus_per_worker: 0.5, torch_threads: 1}
        """))
    final = _job(["jobs.pipeline", "--config-dir", str(conf), "recipe=cnn_alone", "compare=[logmel]",
                  f"input={small_corpus}", f"root={tmp_path}/run"], tmp_path)
    assert final["serving_model"] == final["served"]["recipe"] == "cnn_alone"
    assert set(final["official_scores"]) == {"cnn_alone", "logmel"}
    current = json.load(open(tmp_path / "run" / "models" / "CURRENT"))
    assert current["recipe"] == "cnn_alone" and current["embedder"] == "encoder"
    assert current["params"]["checkpoint"] == f"{tmp_path}/run/models/cnn-alone/encoder.pt"
    assert final["stages"]["recipes"]["cnn_alone"]["models"]["cnn"]["steps"] == 4
    report = _job(["jobs.evaluate", "--config-dir", str(conf), "recipes=[logmel,cnn_alone]", "baselines=[]",
                   f"input={small_corpus}", f"root={tmp_path}/eval", "plots=false"], tmp_path)
    assert set(report["official_scores"]) == {"logmel", "cnn_alone"}
    rep = json.load(open(report["report_json"]))
    assert rep["methods"]["cnn_alone"]["info"]["models"]["cnn"]["encoders"] == [
        f"{tmp_path}/eval/models/cnn-alone/encoder.pt"]
    assert rep["served_method"] == "fused"  # the served recipe is still the shipped one here
