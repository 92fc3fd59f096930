"""The whole system, stage after stage: ``python -m jobs.pipeline``.

With no arguments it runs on the embedded default (local Ray, ``./outputs/default``, a generated
corpus): make_corpus -> featurize -> the served recipe (``jobs/conf/served.yaml``) and the recipes
of ``compare`` beside it, step by step for all of them (pretrain -> pseudo_label -> finetune ->
embed -> score; what recipes share is made once) -> one table of every scored recipe -> the served
recipe's model named the serving model (``models/CURRENT``) for nightly rescoring. It ends by
printing the reports, the table and where they are, and one JSON line.

``recipe=<name>`` serves another recipe (``jobs/conf/recipe``), ``compare=[]`` scores it alone,
``stages=[score]`` reruns one stage (what the earlier stages made must be there), ``root=s3://bucket/run
input=s3://bucket/corpus`` moves the run to object storage, ``device=gpu`` moves training,
embedding and scoring to GPUs.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from asd.io.serving import set_current_model
from asd.recipes.report import write_comparison
from asd.recipes.run import STEPS, missing_files
from asd.stages.finetune import SingleClassError
from jobs import featurize as featurize_job
from jobs import make_corpus as make_corpus_job
from jobs import schema
from jobs.common import (
    apply_input,
    check_paths,
    compose_recipes,
    final_line,
    init_ray,
    log,
    recipe_run,
    refuse_path_as_data,
    setup_logging,
)

schema.register()

STAGES = ["make_corpus", "featurize", *STEPS]


def run(cfg: DictConfig) -> dict:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {STAGES}")
    apply_input(cfg)
    served = cfg.recipe.name
    recipes = compose_recipes(cfg, [served, *(n for n in cfg.compare if n != served)])
    problems = missing_files(recipes.values())
    if problems:
        raise FileNotFoundError("; ".join(problems))
    results: dict = {}
    if "make_corpus" in cfg.stages and cfg.data.get("generate", False):
        log.info("=== stage make_corpus ===")
        results["make_corpus"] = make_corpus_job.run(cfg)
    if "featurize" in cfg.stages:
        log.info("=== stage featurize ===")
        with open_dict(cfg):
            cfg.output = cfg.root
        results["featurize"] = featurize_job.run(cfg)
    runner = recipe_run(cfg, stages=[s for s in cfg.stages if s in STEPS])
    skipped: dict[str, str] = {}  # recipe -> why it could not run on this corpus
    for step in STEPS:
        if step not in cfg.stages:
            continue
        log.info("=== stage %s ===", step)
        for name, recipe in recipes.items():
            if name in skipped:
                continue
            try:
                runner.run(recipe, steps=[step])
            except SingleClassError as exc:  # e.g. real labels of a corpus with one attribute value
                if name == served:
                    raise
                log.warning("recipe %s not run: %s", name, exc)
                skipped[name] = f"not run: {exc}"
    results["recipes"] = {n: r.to_dict() for n, r in runner.results.items()}
    summary: dict = {"root": cfg.root, "stages": results}
    if "score" in cfg.stages:
        scored = {n: r.score for n, r in runner.results.items() if r.score is not None}
        res = runner.results[served]
        set_current_model(cfg.root, served, res.embedder, res.params, recipe=served)
        summary.update(write_comparison(cfg.root, scored, skipped, served), serving_model=served)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    setup_logging(cfg.log_level)
    apply_input(cfg)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    check_paths(cfg)
    init_ray(cfg.ray)
    final_line(run(cfg))


if __name__ == "__main__":
    refuse_path_as_data()
    main()
