"""Label a recipe's training clips: ``python -m jobs.pseudo_label [recipe=<name>] [recipe.labels.cluster.n_clusters=8]``.

Ward pseudo labels of the representation the recipe clusters (one Ray task per machine type), or
its section / real labels; writes ``<root>/labels/<tag>/`` (with a dendrogram PNG per type)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jobs import schema
from jobs.common import recipe_from_config, recipe_run, run_job

schema.register()


def run(cfg: DictConfig) -> dict:
    recipe = recipe_from_config(cfg.recipe)
    if recipe.labels is None:
        raise ValueError(f"recipe {recipe.name!r} trains nothing, so it has no labels")
    runner = recipe_run(cfg, stages=["pretrain", "pseudo_label"] if recipe.labels.clustered == "pretrained"
                        else ["pseudo_label"])
    runner.labels(recipe)
    return {"stage": "pseudo_label", "recipe": recipe.name, **runner.results[recipe.name].labels}


@hydra.main(version_base="1.3", config_path="conf", config_name="pseudo_label")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
