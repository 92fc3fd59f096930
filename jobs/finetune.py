"""Attribute fine-tuning of the pre-trained encoder: ``python -m jobs.finetune finetune=pseudo root=<dir|s3://...>``.

Reads ``<root>/features`` and the labels of ``<root>/labels/<embed tag>`` (run pseudo_label
first), starts from ``<root>/models/pretrain/encoder.pt``, checkpoints to
``<root>/checkpoints/<tag>`` (a rerun continues from the latest checkpoint) and exports
``<root>/models/<tag>/encoder.pt``, which the ``finetuned`` embedding scores.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from asd.finetune import FinetuneConfig, finetune
from jobs import schema
from jobs.common import run_job, stage_configs, training_summary

schema.register("finetune")


def run(cfg: DictConfig, node: DictConfig | None = None) -> dict:
    fcfg, tcfg = stage_configs(node if node is not None else cfg.finetune, FinetuneConfig)
    out, info = training_summary("finetune", fcfg.tag, finetune(cfg.root, cfg.root, fcfg, tcfg))
    out["accuracy"] = [(h["step"], round(h["acc"], 4)) for h in info.get("history", []) if "acc" in h]
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    main()
