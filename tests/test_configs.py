"""One config source: the stage dataclasses (jobs.schema); the YAML options state only what differs."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from jobs import schema

CONF = Path(__file__).resolve().parents[1] / "jobs" / "conf"
OPTIONS = [(g, p.stem) for g in schema.GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def _raw(group: str, name: str) -> dict:
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}  # group "": a job's config


def _defaults(raw: dict) -> list:
    return [d for d in raw.get("defaults", []) if d != "_self_"]


def _effective_default(group: str, entry):
    """One defaults entry of an option of ``group``: an option of the same group (``cnn``), or one of
    another group placed at a package of this option (``/finetune@models.cnn: cnn``)."""
    if isinstance(entry, str):
        return _effective(group, entry)
    (key, name), = entry.items()
    other, _, package = key.lstrip("/").partition("@")
    node = _effective(other, name)
    for part in reversed(package.split(".") if package else []):
        node = {part: node}
    return OmegaConf.merge(OmegaConf.structured(schema.node(group)), node)


def _effective(group: str, name: str):
    """What an option composes to within its group: its defaults list, then its own keys."""
    if name == schema.SCHEMA:
        return OmegaConf.structured(schema.node(group))
    raw = _raw(group, name)
    base = OmegaConf.merge(*(_effective_default(group, d) for d in _defaults(raw)))
    return OmegaConf.merge(base, {k: v for k, v in raw.items() if k != "defaults"})


def _restated(raw, base, where=""):
    """Paths of ``raw``'s leaves whose value is already ``base``'s."""
    out = []
    for k, v in raw.items():
        here = f"{where}.{k}" if where else k
        b = base.get(k) if isinstance(base, dict) else None
        if isinstance(v, dict) and isinstance(b, dict) and v:
            out += _restated(v, b, here)
        elif k in (base or {}) and v == b:
            out.append(here)
    return out


def _starts_from_schema(group: str, name: str) -> bool:
    ds = [d for d in _defaults(_raw(group, name)) if isinstance(d, str)]
    return schema.SCHEMA in ds or any(_starts_from_schema(group, d) for d in ds)


def test_every_stage_group_has_a_schema():
    """Only the job-level groups (which corpus, which Ray, experiments) have none."""
    dirs = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert dirs - set(schema.GROUPS) == {"data", "experiment", "ray"}
    assert len(OPTIONS) >= 20


@pytest.mark.parametrize(("group", "name"), OPTIONS, ids=[f"{g}/{n}" for g, n in OPTIONS])
def test_an_option_starts_from_its_dataclass_and_states_only_what_differs(group, name):
    raw = _raw(group, name)
    assert _starts_from_schema(group, name), f"{group}/{name}.yaml: defaults must start from '{schema.SCHEMA}'"
    base = OmegaConf.merge(*(_effective_default(group, d) for d in _defaults(raw)))
    restated = _restated({k: v for k, v in raw.items() if k != "defaults"},
                         OmegaConf.to_container(base, resolve=False))
    assert not restated, f"{group}/{name}.yaml restates its defaults: {restated}"


def test_every_recipe_names_itself_after_its_file_and_builds():
    """A recipe is one YAML file of jobs/conf/recipe; its name is the file's, and it builds the
    library's Recipe (which checks it: what it embeds exists, models have labels, ...)."""
    from jobs.common import compose_config, compose_recipes

    names = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
    assert {"fused", "logmel", "cnn", "mod", "pretrained", "finetuned", "cnn_section", "cnn_real"} <= set(names)
    recipes = compose_recipes(compose_config("evaluate"), names)
    assert [r.name for r in recipes.values()] == names
    fused = recipes["fused"]
    assert [e.source for e in fused.embed] == ["cnn", "mod"] and fused.models["mod"].finetune.members == 5
    assert recipes["cnn"].models["cnn"] == fused.models["cnn"]  # one model: trained once when both run
    assert recipes["mod"].models["mod"] == fused.models["mod"] and recipes["mod"].embed[0].members == 1
    assert recipes["cnn_section"].models["cnn"].finetune.tag != fused.models["cnn"].finetune.tag  # other labels


def test_the_hydra_block_is_written_once_and_every_job_starts_from_base():
    texts = {p: p.read_text() for p in CONF.rglob("*.yaml")}
    assert [p.name for p, text in texts.items() if "\nhydra:" in "\n" + text] == ["base.yaml"]
    jobs = [p for p in CONF.glob("*.yaml") if p.stem not in ("base", "served")]
    assert len(jobs) == 10
    for p in jobs:
        assert _raw("", p.stem)["defaults"][0] == "base", p.name


JOBS = ("pipeline", "evaluate", "featurize", "make_corpus", "pretrain", "pseudo_label", "finetune", "embed", "score",
        "rescore")


def test_standalone_jobs_share_the_pipelines_defaults():
    """Every job composes the settings it shares with the pipeline to the same values: the corpus,
    the served recipe, the front ends, the embedding actors, scoring, Ray, the device, the root."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        pipeline = OmegaConf.to_container(compose("pipeline"))
        for job in JOBS:
            cfg = OmegaConf.to_container(compose(job, overrides=["inbox=x"] if job == "rescore" else []))
            shared = set(cfg) & set(pipeline) - {"run", "root", "stages", "compare", "recipe_overrides"}
            assert {"data", "ray", "device", "log_level", "input"} <= shared, job
            for key in shared:
                assert cfg[key] == pipeline[key], f"jobs.{job}'s {key} differs from the pipeline's"
            if job not in ("featurize", "make_corpus", "rescore"):
                assert cfg["recipe"] == pipeline["recipe"], job  # the served recipe
        assert compose("evaluate").run == "evaluate"  # its own root by default, as before


def test_the_schema_is_the_dataclass():
    """A changed dataclass default changes the composed job config (no second copy in YAML)."""
    from asd.stages.score import ScoreConfig
    from asd.training.loop import TrainConfig

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("pipeline")
        assert cfg.score.threshold_q == ScoreConfig().threshold_q
        assert cfg.recipe.models.cnn.train.min_lr_ratio == TrainConfig().min_lr_ratio
        assert cfg.recipe.models.cnn.train.steps == 600 != TrainConfig().steps  # what cnn.yaml states
        assert cfg.recipe.models.cnn.train.name == "cnn"  # the schema: name: ${..tag}, resolved
        ev = compose("evaluate")
        assert (ev.ae.epochs, ev.ae.batch_size, ev.ae.lr, ev.ae.validation_split) == (100, 256, 1e-3, 0.1)  # published
        # every key is known before anything runs, so a typo fails at composition
        with pytest.raises(Exception, match="kk"):
            compose("score", overrides=["score.kk=3"])
        # and every field can be set without '+'
        cfg = compose("pretrain", overrides=["recipe=pretrained", "recipe.pretrain.train.tf32=false"])
        assert cfg.recipe.pretrain.train.tf32 is False


def test_no_shipped_config_names_a_test_only_knob():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for job in ("pipeline", "evaluate", "pretrain", "finetune", "featurize", "rescore"):
            text = OmegaConf.to_yaml(compose(job, overrides=["inbox=x"] if job == "rescore" else []))
            assert not [k for k in schema.TEST_ONLY if f"{k}:" in text], job
        # a test adds one with '+'; the stage's dataclass still checks it
        cfg = compose("pretrain", overrides=["recipe=pretrained", "+recipe.pretrain.train.fail_at_step=3"])
        assert cfg.recipe.pretrain.train.fail_at_step == 3
