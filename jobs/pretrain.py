"""Self-supervised pre-training of a recipe's encoder: ``python -m jobs.pretrain [recipe=pretrained] [root=...]``.

Reads ``<root>/features`` (run featurize first), checkpoints to ``<root>/checkpoints/<tag>`` (a
rerun continues from the latest checkpoint) and exports ``<root>/models/<tag>/encoder.pt``. The
pipeline names the serving model (``models/CURRENT``) once a recipe is scored; this job does not.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jobs import schema
from jobs.common import recipe_from_config, recipe_run, run_job

schema.register()


def run(cfg: DictConfig) -> dict:
    recipe = recipe_from_config(cfg.recipe)
    if recipe.pretrain is None:
        raise ValueError(f"recipe {recipe.name!r} pre-trains nothing; pick one that does (e.g. recipe=pretrained)")
    runner = recipe_run(cfg, stages=["pretrain"])
    runner.pretrained(recipe)
    return {"stage": "pretrain", "recipe": recipe.name, **runner.results[recipe.name].pretrain}


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
