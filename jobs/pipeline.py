"""The whole system, stage after stage: ``python -m jobs.pipeline``.

With no arguments it runs on the embedded default (local Ray, ``./outputs/default``,
a generated corpus): make_corpus -> featurize -> pretrain (tiny) -> embed -> score,
where embed and score run once per entry of ``embeds`` (log-mel statistics and the
pre-trained encoder), and it ends by printing the reports, a side-by-side table and
where they are. Every stage is a config group, so ``stages=[score]`` reruns one
stage, ``root=s3://bucket/run data=dir data.input=s3://bucket/corpus`` moves it to
object storage, ``~embeds.pretrained`` drops an embedding, and ``score.k=3`` swaps
parts. The embedding named by ``serve`` becomes the serving model (models/CURRENT)
for nightly rescoring.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from asd import metrics, report, storage
from asd.rescore import set_current_model
from jobs import embed as embed_job
from jobs import featurize as featurize_job
from jobs import make_corpus as make_corpus_job
from jobs import pretrain as pretrain_job
from jobs import score as score_job
from jobs.common import final_line, init_ray, log, setup_logging

STAGES = ["make_corpus", "featurize", "pretrain", "embed", "score"]


def _with_embed(cfg: DictConfig, node: DictConfig) -> DictConfig:
    sub = cfg.copy()
    with open_dict(sub):
        sub.embed = node
    return sub


def run(cfg: DictConfig) -> dict:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {STAGES}")
    with open_dict(cfg):
        cfg.input = cfg.data.input
        cfg.output = cfg.root
    embeds = {name: node for name, node in (cfg.get("embeds") or {}).items() if node is not None}
    results: dict = {}
    for stage in cfg.stages:
        if stage == "make_corpus" and not cfg.data.get("generate", False):
            continue
        log.info("=== stage %s ===", stage)
        if stage == "embed":
            results[stage] = {n: embed_job.run(_with_embed(cfg, e)) for n, e in embeds.items()}
        elif stage == "score":
            results[stage] = {n: score_job.run(_with_embed(cfg, e)) for n, e in embeds.items()}
        else:
            results[stage] = {"make_corpus": make_corpus_job.run, "featurize": featurize_job.run,
                              "pretrain": pretrain_job.run}[stage](cfg)
    summary: dict = {"root": cfg.root, "stages": results}
    scored = results.get("score") or {}
    if scored:
        serve = cfg.serve if cfg.serve in embeds else next(iter(embeds))
        node = embeds[serve]
        set_current_model(cfg.root, node.tag, node.embedder, OmegaConf.to_container(node.params, resolve=True))
        summary.update(_compare(cfg.root, scored), serving_model=node.tag)
    return summary


def _compare(root: str, scored: dict) -> dict:
    """Print every report and a side-by-side table; write it as scores/comparison.{md,png}."""
    results, out = {}, {}
    for name, res in scored.items():
        if not res.get("report"):
            continue
        print("\n" + storage.read_text(res["report"]), flush=True)
        results[res["tag"]] = metrics.evaluate_table(storage.read_table(storage.join(res["scores"], "scores.parquet")))
        out.setdefault("reports", {})[name] = res["report"]
        out.setdefault("official_scores", {})[name] = res["official_score"]
    if results:
        table = report.methods_markdown(results)
        md = storage.atomic_write_text(storage.join(root, "scores", "comparison.md"),
                                       "# Official DCASE score per embedding (kNN)\n\n" + table + "\n")
        report.plot_method_bars(storage.join(root, "scores", "comparison.png"), results)
        print("\n" + table, flush=True)
        for name, uri in out["reports"].items():
            print(f"report ({name}): {uri}", flush=True)
        print(f"comparison: {md}", flush=True)
        out["comparison"] = md
        first = next(iter(out["official_scores"]))
        out["report"], out["official_score"] = out["reports"][first], out["official_scores"][first]
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    setup_logging(cfg.log_level)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    init_ray(cfg.ray)
    final_line(run(cfg))


if __name__ == "__main__":
    main()
