"""Score the test clips against the normal training clips with a recipe's embedding:
``python -m jobs.score [recipe=<name>] [score.k=3]``. Writes ``<root>/scores/<recipe name>/``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from asd.io import storage
from jobs import schema
from jobs.common import recipe_from_config, recipe_run, run_job

schema.register()


def run(cfg: DictConfig) -> dict:
    recipe = recipe_from_config(cfg.recipe)
    res = recipe_run(cfg, stages=["score"]).score(recipe)
    out = {"stage": "score", "recipe": recipe.name, **res.to_dict()}
    out.pop("metrics", None)
    out["metrics_json"] = storage.join(res.scores, "metrics.json") if res.metrics else None
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="score")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
