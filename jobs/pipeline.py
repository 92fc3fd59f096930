"""The whole system, stage after stage: ``python -m jobs.pipeline``.

With no arguments it runs on the embedded default (local Ray, ``./outputs/default``,
a generated corpus): make_corpus -> featurize -> pretrain (tiny) -> embed ->
pseudo_label -> finetune -> score, and ends by printing the reports, a side-by-side
table and where they are.

* ``embeds`` names the embeddings that are scored (log-mel statistics, the pre-trained
  encoder, the fine-tuned encoder). The ``embed`` stage embeds every entry whose model
  exists by then; an entry whose ``after`` names a stage that runs later in this run
  (``finetuned``: ``after: finetune``) is embedded as soon as that stage has run.
* ``pseudo_label`` clusters the embeddings of ``cluster_embed`` (default: pretrained) into
  ``labels/<cluster_embed>``; ``finetune`` runs every entry of ``finetunes`` on those labels.
* ``+experiment=ablation`` adds fine-tuning on the real attribute labels, so the one table
  compares (a) log-mel statistics, (b) pre-trained only, (c) fine-tuned on pseudo labels and
  (d) fine-tuned on real labels.

Every stage is a config group, so ``stages=[score]`` reruns one stage, ``root=s3://bucket/run
data=dir data.input=s3://bucket/corpus`` moves it to object storage, ``~embeds.pretrained``
drops an embedding, and ``score.k=3`` swaps parts. The embedding named by ``serve`` becomes the
serving model (models/CURRENT) for nightly rescoring.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from asd import metrics, report, storage
from asd.finetune import SingleClassError
from asd.serving import set_current_model
from jobs import embed as embed_job
from jobs import featurize as featurize_job
from jobs import finetune as finetune_job
from jobs import make_corpus as make_corpus_job
from jobs import pretrain as pretrain_job
from jobs import pseudo_label as pseudo_label_job
from jobs import schema
from jobs import score as score_job
from jobs.common import (
    apply_device,
    apply_input,
    check_paths,
    final_line,
    init_ray,
    log,
    refuse_path_as_data,
    setup_logging,
)

schema.register()  # every stage's schema

STAGES = ["make_corpus", "featurize", "pretrain", "embed", "pseudo_label", "finetune", "score"]


def _with_embed(cfg: DictConfig, node: DictConfig) -> DictConfig:
    sub = cfg.copy()
    with open_dict(sub):
        sub.embed = node
    return sub


def run(cfg: DictConfig) -> dict:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {STAGES}")
    apply_input(cfg)
    with open_dict(cfg):
        cfg.output = cfg.root
    embeds = {name: node for name, node in (cfg.get("embeds") or {}).items() if node is not None}
    finetunes = {name: node for name, node in (cfg.get("finetunes") or {}).items() if node is not None}
    stages = list(cfg.stages)
    results: dict = {}
    skipped: dict[str, str] = {}  # embedding -> why it is not scored

    def embed_all(names: list[str]) -> None:
        for n in names:
            log.info("--- embedding %s ---", n)
            results.setdefault("embed", {})[n] = embed_job.run(_with_embed(cfg, embeds[n]))

    for i, stage in enumerate(stages):
        if stage == "make_corpus" and not cfg.data.get("generate", False):
            continue
        log.info("=== stage %s ===", stage)
        later = set(stages[i + 1:])
        if stage == "embed":
            embed_all([n for n, e in embeds.items() if e.get("after") not in later])
        elif stage == "pseudo_label":
            results[stage] = pseudo_label_job.run(_with_embed(cfg, _cluster_embed(cfg, embeds)))
        elif stage == "finetune":
            results[stage] = {}
            for n, node in finetunes.items():
                try:
                    results[stage][n] = finetune_job.run(cfg, _with_labels(cfg, node))
                except SingleClassError as exc:  # e.g. real labels of a corpus with one attribute value
                    dropped = [e for e, emb in embeds.items() if emb.tag == node.embed_tag]
                    log.warning("finetunes.%s not trained: %s; not scored: %s", n, exc, dropped)
                    results[stage][n] = {"skipped": str(exc), "not_scored": dropped}
                    for e in dropped:
                        skipped[e] = f"not trained: {exc}"
                        del embeds[e]
        elif stage == "score":
            results[stage] = {n: score_job.run(_with_embed(cfg, e)) for n, e in embeds.items()}
        else:
            results[stage] = {"make_corpus": make_corpus_job.run, "featurize": featurize_job.run,
                              "pretrain": pretrain_job.run}[stage](cfg)
        if stage != "embed" and "embed" in stages[:i]:  # entries that waited for this stage's model
            embed_all([n for n, e in embeds.items() if e.get("after") == stage])
    summary: dict = {"root": cfg.root, "stages": results}
    scored = results.get("score") or {}
    if scored:
        serve = cfg.serve if cfg.serve in embeds else next(iter(embeds))
        if serve != cfg.serve:
            log.warning("serve=%s was not scored in this run; serving %s instead", cfg.serve, serve)
        node = embeds[serve]
        params = OmegaConf.to_container(node.params, resolve=True)
        set_current_model(cfg.root, node.tag, node.embedder, params, encoder=params.get("checkpoint"))
        summary.update(_compare(cfg.root, scored, skipped, serve=serve), serving_model=node.tag)
    return summary


def _cluster_embed(cfg: DictConfig, embeds: dict) -> DictConfig:
    name = cfg.get("cluster_embed") or "pretrained"
    if name not in embeds:
        raise ValueError(f"cluster_embed={name!r} is not one of the embeddings {sorted(embeds)}")
    return embeds[name]


def _with_labels(cfg: DictConfig, node: DictConfig) -> DictConfig:
    """A finetunes entry with ``labels`` defaulting to the pseudo_label stage's output."""
    node = node.copy()
    with open_dict(node):
        if node.get("labels") is None:
            node.labels = storage.join(cfg.root, "labels", _cluster_embed(cfg, cfg.embeds).tag)
    return node


def _compare(root: str, scored: dict, skipped: dict[str, str] | None = None, serve: str | None = None) -> dict:
    """Print every report and a side-by-side table; write it as scores/comparison.{md,png}.

    The served embedding (``serve``, the model behind models/CURRENT) leads: its report is printed
    last (nearest the summary), its column comes first, and the headline ``official_score`` and
    ``report`` are its own; the other embeddings follow under ``official_scores``/``reports``."""
    results, out = {}, {}
    order = [n for n in sorted(scored, key=lambda n: n != serve) if scored[n].get("report")]  # served first
    for name in order[1:] + order[:1]:  # printed with the served report last, nearest the summary
        print("\n" + storage.read_text(scored[name]["report"]), flush=True)
    for name in order:
        res = scored[name]
        results[res["tag"]] = metrics.evaluate_table(storage.read_table(storage.join(res["scores"], "scores.parquet")))
        out.setdefault("reports", {})[name] = res["report"]
        out.setdefault("official_scores", {})[name] = res["official_score"]
    if results:
        table = report.methods_markdown(results)
        notes = "".join(f"\n- **{name}** is missing: {why}" for name, why in (skipped or {}).items())
        md = storage.atomic_write_text(storage.join(root, "scores", "comparison.md"),
                                       "# Official DCASE score per embedding (kNN)\n\n" + table + "\n" + notes
                                       + ("\n" if notes else ""))
        report.plot_method_bars(storage.join(root, "scores", "comparison.png"), results)
        print("\n" + table, flush=True)
        for name, uri in out["reports"].items():
            print(f"report ({name}): {uri}", flush=True)
        print(f"comparison: {md}", flush=True)
        out["comparison"] = md
        head = next(iter(out["official_scores"]))  # the served embedding, when it was scored
        out["report"], out["official_score"] = out["reports"][head], out["official_scores"][head]
        out["served"] = {"embedding": head, "official_score": out["official_score"], "report": out["report"]}
        others = ", ".join(f"{n} {100 * v:.2f} %" for n, v in out["official_scores"].items() if n != head)
        print(f"\nserved model ({head}, models/CURRENT): official score {100 * out['official_score']:.2f} %"
              + (f"; others: {others}" if others else ""), flush=True)
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    setup_logging(cfg.log_level)
    apply_device(cfg)
    apply_input(cfg)
    log.info("config:\n%s", OmegaConf.to_yaml(cfg))
    check_paths(cfg)
    init_ray(cfg.ray)
    final_line(run(cfg))


if __name__ == "__main__":
    refuse_path_as_data()
    main()
