"""Embed every featurized clip: ``python -m jobs.embed embed=logmel root=<dir|s3://...>``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from asd.embed import EmbedConfig, embed
from jobs import schema
from jobs.common import run_job, to_dataclass

schema.register("embed")


def run(cfg: DictConfig) -> dict:
    node = OmegaConf.to_container(cfg.embed, resolve=True)
    tag = node.pop("tag")
    node.pop("after", None)  # the pipeline's ordering hint
    res = embed(cfg.root, tag, to_dataclass(EmbedConfig, node))
    return {"stage": "embed", "tag": tag, **res.to_dict()}


@hydra.main(version_base="1.3", config_path="conf", config_name="embed")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
