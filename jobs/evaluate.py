"""Accuracy of several recipes and the DCASE autoencoder baseline on the same data and split:
``python -m jobs.evaluate [data=<...> | input=<dir|s3://...>] [recipes=[...]] [baselines=[...]]``.

``data=dir data.input=<DCASE-layout dir or s3://...>`` (or ``input=...``) evaluates any corpus;
a generating data config (``data=realistic``) generates it first. ``recipes=[logmel,cnn,fused]``
picks recipes of ``jobs/conf/recipe`` (the served one, ``recipe=``, takes the command line's
``recipe.*`` overrides), ``baselines=[]`` leaves the autoencoder out, ``+experiment=ablation`` runs
the paper's ablation, ``report_to=benchmarks/results/evaluate_<name>`` also writes the report
there. See :mod:`asd.recipes.evaluate` for the split rule and :mod:`asd.baselines.autoencoder` for
the baseline.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from asd.baselines.autoencoder import AEConfig
from asd.io import storage
from asd.recipes.evaluate import EvaluateConfig, evaluate
from asd.stages.embed import EmbedConfig
from asd.stages.featurize import FeaturizeConfig
from asd.stages.score import ScoreConfig
from jobs import make_corpus as make_corpus_job
from jobs import schema
from jobs.common import (
    compose_recipes,
    device_config,
    refuse_path_as_data,
    run_job,
    to_dataclass,
)

schema.register()


def evaluate_config(cfg: DictConfig) -> EvaluateConfig:
    """The job's config as :class:`asd.recipes.evaluate.EvaluateConfig` (unknown keys are errors)."""
    return EvaluateConfig(
        recipes=list(compose_recipes(cfg, list(cfg.recipes)).values()), baselines=tuple(cfg.baselines),
        served=cfg.recipe.name, derive_fraction=cfg.derive_fraction, plots=cfg.plots,
        featurize=to_dataclass(FeaturizeConfig, cfg.featurize), embed=to_dataclass(EmbedConfig, cfg.embed),
        score=to_dataclass(ScoreConfig, cfg.score), device=device_config(cfg), ae=to_dataclass(AEConfig, cfg.ae))


def run(cfg: DictConfig) -> dict:
    ecfg = evaluate_config(cfg)  # a bad config fails before the corpus is generated
    if cfg.report_to:  # the one write outside the root, on purpose (e.g. benchmarks/results/...)
        storage.validate_uri(cfg.report_to, "report_to")
    made = make_corpus_job.run(cfg) if cfg.data.get("generate", False) else None
    res = evaluate(cfg.data.input, cfg.root, ecfg, name=cfg.name,
                   config_snapshot=OmegaConf.to_container(cfg, resolve=True), report_to=cfg.report_to)
    out = {"stage": "evaluate", "root": cfg.root, **res.to_dict()}
    if made is not None:
        out["corpus"] = made["corpus"]
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    refuse_path_as_data()
    main()
