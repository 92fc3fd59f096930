"""Nightly rescoring: ``python -m jobs.rescore root=s3://bucket/run inbox=s3://bucket/inbox/2026-11-25 date=2026-11-25``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from asd.stages.embed import EmbedConfig
from asd.stages.featurize import FeaturizeConfig
from asd.stages.rescore import RescoreConfig, rescore
from asd.stages.score import ScoreConfig
from jobs import schema
from jobs.common import device_config, run_job, to_dataclass

schema.register("featurize", "embed", "score", "device")


def run(cfg: DictConfig) -> dict:
    rcfg = RescoreConfig(featurize=to_dataclass(FeaturizeConfig, cfg.featurize),
                         embed=to_dataclass(EmbedConfig, cfg.embed), score=to_dataclass(ScoreConfig, cfg.score),
                         device=device_config(cfg))
    res = rescore(cfg.inbox, cfg.root, date=cfg.date, cfg=rcfg)
    return {"stage": "rescore", **res.to_dict()}


@hydra.main(version_base="1.3", config_path="conf", config_name="rescore")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
