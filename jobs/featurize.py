"""Featurize a corpus: ``python -m jobs.featurize input=<dir|s3://...> output=<dir|s3://...>``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from asd.stages.featurize import FeaturizeConfig, featurize
from jobs import schema
from jobs.common import refuse_path_as_data, run_job, to_dataclass

schema.register("featurize", "device")


def run(cfg: DictConfig) -> dict:
    res = featurize(cfg.input, cfg.output, to_dataclass(FeaturizeConfig, cfg.featurize))
    return {"stage": "featurize", **res.to_dict()}


@hydra.main(version_base="1.3", config_path="conf", config_name="featurize")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    refuse_path_as_data()
    main()
