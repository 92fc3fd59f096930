"""Accuracy of several methods, the official DCASE autoencoder baseline among them, on the same
data and split: ``python -m jobs.evaluate data=<dir|roboticarm|synthetic>``.

``data=dir data.input=<DCASE-layout dir or s3://...>`` evaluates any corpus; ``data=synthetic``
generates one first. ``methods=[ae_mse,ae_mahalanobis,logmel_knn,pretrained_knn,finetuned_knn]``
picks the methods (``finetuned_knn`` fine-tunes in the run on pseudo labels, or takes
``finetuned.checkpoint=<encoder.pt>``);
``report_to=benchmarks/results/evaluate_<name>`` also writes the report there. See
:mod:`asd.evaluate` for the split rule and :mod:`asd.baselines.autoencoder` for the baseline.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from asd import storage
from asd.evaluate import EvaluateConfig, evaluate
from jobs import make_corpus as make_corpus_job
from jobs import schema
from jobs.common import refuse_path_as_data, run_job, to_dataclass

schema.register()  # every stage's schema


def evaluate_config(cfg: DictConfig) -> EvaluateConfig:
    """The job's config as :class:`asd.evaluate.EvaluateConfig` (unknown keys are errors)."""
    node = OmegaConf.to_container(cfg, resolve=True)
    ae = dict(node["ae"])
    ae_train = ae.pop("train", None) or {}
    pretrained = dict(node["pretrained"])
    pretrain = dict(pretrained.pop("pretrain", None) or {})
    pretrain_train = pretrain.pop("train", None) or {}
    return to_dataclass(EvaluateConfig, {
        "methods": list(node["methods"]),
        "derive_fraction": node["derive_fraction"],
        "plots": node["plots"],
        "featurize": node["featurize"],
        "score": node["score"],
        "ae": ae,
        "ae_train": ae_train,
        "logmel": node["logmel"],
        "pretrained": {**pretrained, "pretrain": pretrain, "pretrain_train": pretrain_train},
        "finetuned": _finetuned(dict(node["finetuned"])),
        "cnn": _finetuned(dict(node["cnn"])),
        "mod": _finetuned(dict(node["mod"])),
        "served_method": node.get("served_method"),
    })


def _finetuned(node: dict) -> dict:
    finetune = dict(node.pop("finetune", None) or {})
    cluster = dict(node.pop("cluster", None) or {})
    if "auto_range" in cluster:
        cluster["auto_range"] = tuple(cluster["auto_range"])
    out = {**node, "finetune": finetune, "finetune_train": finetune.pop("train", None) or {}}
    return {**out, "cluster": cluster} if cluster else out  # the mod method clusters nothing (cnn's labels)


def run(cfg: DictConfig) -> dict:
    ecfg = evaluate_config(cfg)  # a bad config fails before the corpus is generated
    if cfg.report_to:  # the one write outside the root, on purpose (e.g. benchmarks/results/...)
        storage.validate_uri(cfg.report_to, "report_to")
    made = make_corpus_job.run(cfg) if cfg.data.get("generate", False) else None
    res = evaluate(cfg.data.input, cfg.root, ecfg, name=cfg.name,
                   config_snapshot=OmegaConf.to_container(cfg, resolve=True), report_to=cfg.report_to)
    out = {"stage": "evaluate", "root": cfg.root, **res.to_dict()}
    if made is not None:
        out["corpus"] = made["corpus"]
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_job(cfg, run)


if __name__ == "__main__":
    refuse_path_as_data()
    main()
