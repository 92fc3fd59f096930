"""Embed every featurized clip with a recipe: ``python -m jobs.embed [recipe=<name>] [root=...]``
(its models must be trained). Writes ``<root>/embeddings/<recipe name>/``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jobs import schema
from jobs.common import recipe_from_config, recipe_run, run_job

schema.register()


def run(cfg: DictConfig) -> dict:
    recipe = recipe_from_config(cfg.recipe)
    runner = recipe_run(cfg, stages=["embed"])
    uri = runner.embedding(recipe)
    res = runner.results[recipe.name]
    return {"stage": "embed", "recipe": recipe.name, "embeddings": uri, "embedder": res.embedder}


@hydra.main(version_base="1.3", config_path="conf", config_name="embed")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
