"""Train a recipe's models on its labels: ``python -m jobs.finetune [recipe=<name>] [model=<name>]``.

Reads ``<root>/features`` and the recipe's labels (run pseudo_label first; a transformer also needs
the recipe's pre-trained encoder), checkpoints to ``<root>/checkpoints/<tag>`` (a rerun continues
from the latest checkpoint) and exports ``<root>/models/<tag>/encoder.pt`` (``<tag>-m<i>`` for
the other members of an ensemble).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jobs import schema
from jobs.common import recipe_from_config, recipe_run, run_job

schema.register()


def run(cfg: DictConfig) -> dict:
    recipe = recipe_from_config(cfg.recipe)
    names = [cfg.model] if cfg.get("model") else list(recipe.models)
    unknown = [n for n in names if n not in recipe.models]
    if unknown or not names:
        raise ValueError(f"recipe {recipe.name!r} has the models {sorted(recipe.models)}; asked for {names}")
    runner = recipe_run(cfg, stages=["finetune"])
    for name in names:
        runner.model(recipe, name)
    return {"stage": "finetune", "recipe": recipe.name, "models": runner.results[recipe.name].models}


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
