"""Pseudo-attribute labels by Ward clustering of training-clip embeddings, one Ray task per machine type:
``python -m jobs.pseudo_label embed=pretrained cluster.n_clusters=8``. Writes ``<root>/labels/<tag>/``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from asd import storage
from asd.cluster import pseudo_label
from asd.layout import embeddings_dir
from asd.ward import ClusterConfig
from jobs import schema
from jobs.common import run_job

schema.register("embed", "cluster")


def run(cfg: DictConfig) -> dict:
    node = OmegaConf.to_container(cfg.cluster, resolve=True)
    node["auto_range"] = tuple(node.get("auto_range", (2, 16)))
    tag = cfg.embed.tag
    res = pseudo_label(embeddings_dir(cfg.root, tag), storage.join(cfg.root, "labels", tag), ClusterConfig(**node),
                       manifest_uri=storage.join(cfg.root, "manifest", "manifest.parquet"))
    return {"stage": "pseudo_label", "tag": tag, "labels": storage.join(cfg.root, "labels", tag),
            "n_clips": res.n_clips, "n_types": res.n_types, "quality": res.quality, "seconds": res.seconds}


@hydra.main(version_base="1.3", config_path="conf", config_name="pseudo_label")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
