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
    return yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {}


def _defaults(raw: dict) -> list[str]:
    return [d for d in raw.get("defaults", []) if d != "_self_"]


def _effective(group: str, name: str):
    """What an option composes to within its group: its defaults list, then its own keys."""
    if name == schema.SCHEMA:
        return OmegaConf.structured(schema.node(group))
    raw = _raw(group, name)
    base = OmegaConf.merge(*(_effective(group, d) for d in _defaults(raw)))
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
    ds = _defaults(_raw(group, name))
    return schema.SCHEMA in ds or any(_starts_from_schema(group, d) for d in ds)


def test_every_stage_group_has_a_schema():
    """Only the job-level groups (which corpus, which device, which Ray, experiments) have none."""
    dirs = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert dirs - set(schema.GROUPS) == {"data", "device", "experiment", "ray"}
    assert len(OPTIONS) >= 16


@pytest.mark.parametrize(("group", "name"), OPTIONS, ids=[f"{g}/{n}" for g, n in OPTIONS])
def test_an_option_starts_from_its_dataclass_and_states_only_what_differs(group, name):
    raw = _raw(group, name)
    assert _starts_from_schema(group, name), f"{group}/{name}.yaml: defaults must start from '{schema.SCHEMA}'"
    base = OmegaConf.merge(*(_effective(group, d) for d in _defaults(raw)))
    restated = _restated({k: v for k, v in raw.items() if k != "defaults"},
                         OmegaConf.to_container(base, resolve=False))
    assert not restated, f"{group}/{name}.yaml restates its defaults: {restated}"


def test_evaluate_method_embeddings_state_only_what_differs():
    raw = yaml.safe_load((CONF / "evaluate.yaml").read_text())
    base = OmegaConf.to_container(OmegaConf.structured(schema.node("method_embed")))
    for method in ("logmel", "pretrained", "finetuned", "cnn", "mod"):
        assert not _restated(raw[method].get("embed", {}), base), method


def test_the_schema_is_the_dataclass():
    """A changed dataclass default changes the composed job config (no second copy in YAML)."""
    from asd.loop import TrainConfig
    from asd.score import ScoreConfig

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("pipeline")
        assert cfg.score.threshold_q == ScoreConfig().threshold_q
        assert cfg.pretrain.train.min_lr_ratio == TrainConfig().min_lr_ratio
        assert cfg.finetunes.cnn.train.steps == 600 != TrainConfig().steps  # what cnn.yaml states
        assert cfg.finetunes.cnn.train.name == "cnn"  # pseudo.yaml: name: ${..tag}, resolved
        ev = compose("evaluate")
        assert ev.ae.train.betas == [0.9, 0.999] and ev.ae.train.steps == 1000  # the AE's published settings
        # every key is known before anything runs, so a typo fails at composition
        with pytest.raises(Exception, match="kk"):
            compose("score", overrides=["score.kk=3"])
        # and every field can be set without '+'
        assert compose("pretrain", overrides=["pretrain.train.tf32=true"]).pretrain.train.tf32 is True


def test_no_shipped_config_names_a_test_only_knob():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for job in ("pipeline", "evaluate", "pretrain", "finetune", "featurize", "rescore"):
            text = OmegaConf.to_yaml(compose(job, overrides=["inbox=x"] if job == "rescore" else []))
            assert not [k for k in schema.TEST_ONLY if f"{k}:" in text], job
        # a test adds one with '+'; the stage's dataclass still checks it
        cfg = compose("pretrain", overrides=["+pretrain.train.fail_at_step=3"])
        assert cfg.pretrain.train.fail_at_step == 3
