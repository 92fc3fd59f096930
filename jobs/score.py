"""Score test clips against normal training clips: ``python -m jobs.score embed=logmel score.k=3``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from asd import layout, storage
from asd.layout import embeddings_dir
from asd.score import ScoreConfig, score
from jobs import schema
from jobs.common import run_job, to_dataclass

schema.register("embed", "score")


def run(cfg: DictConfig) -> dict:
    tag = cfg.embed.tag
    res = score(
        embeddings_dir(cfg.root, tag),
        layout.scores_dir(cfg.root, tag),
        to_dataclass(ScoreConfig, cfg.score),
        title=f"{tag} kNN (k={cfg.score.k})",
    )
    out = {"stage": "score", "tag": tag, **res.to_dict()}
    out.pop("metrics", None)
    out["metrics_json"] = storage.join(res.scores, "metrics.json") if res.metrics else None
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="score")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
