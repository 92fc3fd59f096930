"""Self-supervised pre-training of the encoder: ``python -m jobs.pretrain pretrain=tiny root=<dir|s3://...>``.

Reads ``<root>/features`` (run featurize first), checkpoints to ``<root>/checkpoints/<tag>``
(a rerun continues from the latest checkpoint), exports ``<root>/models/<tag>/encoder.pt``
and points ``<root>/models/CURRENT`` at it.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from asd.pretrain import PretrainConfig, pretrain
from asd.train import TrainConfig
from jobs.common import run_job, to_dataclass


def run(cfg: DictConfig) -> dict:
    node = OmegaConf.to_container(cfg.pretrain, resolve=True)
    train = node.pop("train", None) or {}
    pcfg = to_dataclass(PretrainConfig, node)
    tcfg = to_dataclass(TrainConfig, train)
    res = pretrain(cfg.root, cfg.root, pcfg, tcfg)
    out = {"stage": "pretrain", "tag": pcfg.tag, **res.to_dict()}
    train_info = out.pop("train", {})
    out["workers"] = train_info.get("workers", [])
    out["steady_samples_per_s"] = train_info.get("steady_samples_per_s")
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
