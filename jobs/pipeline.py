"""The whole system, stage after stage: ``python -m jobs.pipeline``.

With no arguments it runs on the embedded default (local Ray, ``./outputs/default``,
a generated corpus) and ends by printing where the report is and the metric table.
Every stage is a config group, so ``stages=[score]`` reruns one stage,
``root=s3://bucket/run data=dir data.input=s3://bucket/corpus`` moves it to object
storage, and ``embed=...``/``score.k=3`` swap parts.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from asd import storage
from asd.rescore import set_current_model
from jobs import embed as embed_job
from jobs import featurize as featurize_job
from jobs import make_corpus as make_corpus_job
from jobs import score as score_job
from jobs.common import final_line, init_ray, log, setup_logging

STAGES = {
    "make_corpus": make_corpus_job.run,
    "featurize": featurize_job.run,
    "embed": embed_job.run,
    "score": score_job.run,
}


def run(cfg: DictConfig) -> dict:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {list(STAGES)}")
    with open_dict(cfg):
        cfg.input = cfg.data.input
        cfg.output = cfg.root
    results = {}
    for stage in cfg.stages:
        if stage == "make_corpus" and not cfg.data.get("generate", False):
            continue
        log.info("=== stage %s ===", stage)
        results[stage] = STAGES[stage](cfg)
    summary = {"root": cfg.root, "stages": results}
    score = results.get("score")
    if score:  # the scored embedder becomes the serving model for nightly rescoring
        set_current_model(cfg.root, cfg.embed.tag, cfg.embed.embedder, OmegaConf.to_container(cfg.embed.params, resolve=True))
    if score and score.get("report"):
        summary["report"] = score["report"]
        summary["official_score"] = score["official_score"]
        print("\n" + storage.read_text(score["report"]), flush=True)
        print(f"report: {score['report']}", flush=True)
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    setup_logging(cfg.log_level)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    init_ray(cfg.ray)
    final_line(run(cfg))


if __name__ == "__main__":
    main()
