"""Attribute fine-tuning of the pre-trained encoder: ``python -m jobs.finetune finetune=pseudo root=<dir|s3://...>``.

Reads ``<root>/features`` and the labels of ``<root>/labels/<embed tag>`` (run pseudo_label
first), starts from ``<root>/models/pretrain/encoder.pt``, checkpoints to
``<root>/checkpoints/<tag>`` (a rerun continues from the latest checkpoint) and exports
``<root>/models/<tag>/encoder.pt``, which the ``finetuned`` embedding scores.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from asd.finetune import FinetuneConfig, finetune
from asd.train import TrainConfig
from jobs.common import run_job, to_dataclass


def run(cfg: DictConfig, node: DictConfig | None = None) -> dict:
    node = OmegaConf.to_container(node if node is not None else cfg.finetune, resolve=True)
    train = node.pop("train", None) or {}
    fcfg = to_dataclass(FinetuneConfig, node)
    tcfg = to_dataclass(TrainConfig, train)
    res = finetune(cfg.root, cfg.root, fcfg, tcfg)
    out = {"stage": "finetune", "tag": fcfg.tag, **res.to_dict()}
    train_info = out.pop("train", {})
    out["workers"] = train_info.get("workers", [])
    out["accuracy"] = [(h["step"], round(h["acc"], 4)) for h in train_info.get("history", []) if "acc" in h]
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
