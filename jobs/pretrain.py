"""Self-supervised pre-training of the encoder: ``python -m jobs.pretrain pretrain=tiny root=<dir|s3://...>``.

Reads ``<root>/features`` (run featurize first), checkpoints to ``<root>/checkpoints/<tag>``
(a rerun continues from the latest checkpoint), exports ``<root>/models/<tag>/encoder.pt``
and points ``<root>/models/CURRENT`` at it.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from asd.pretrain import PretrainConfig, pretrain
from jobs import schema
from jobs.common import run_job, stage_configs, training_summary

schema.register("pretrain")


def run(cfg: DictConfig) -> dict:
    pcfg, tcfg = stage_configs(cfg.pretrain, PretrainConfig)
    out, _ = training_summary("pretrain", pcfg.tag, pretrain(cfg.root, cfg.root, pcfg, tcfg))
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
