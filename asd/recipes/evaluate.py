"""Side-by-side accuracy of several recipes and the DCASE autoencoder baseline, on the same data and
the same split, in one run.

:func:`evaluate` featurizes a DCASE-layout corpus (local or ``s3://``) once per front end it needs,
fixes one train/test split (:func:`asd.recipes.split.plan_split`), runs every recipe through
:class:`asd.recipes.run.RecipeRun` (the pipeline's own wiring: the same stage functions, labels
and models made once and shared between recipes) on that split, trains the autoencoder once for
both of its scores, writes each method's scores like the scoring stage (``<root>/scores/<method>/``:
scores.parquet, DCASE CSVs, metrics.json, report.md, plots) and one comparison report
``<root>/evaluate/report.{md,json,png}`` (:mod:`asd.recipes.report`).

**The split** is decided once, the same for every method: train folders' clips (not labelled
anomalous) train and form the memory banks, test folders' clips are scored, a section without
training clips gets a derived training split from its normal test clips (never scored), and a test
clip with the bytes of a training clip is excluded. Training stages read the training clips as a
feature view of their own (``evaluate/train_view``), and every model is trained anew (an evaluation
never continues an earlier run's checkpoints). Every method's scored clips are checked to be
exactly the test set; the report carries the data and split checksums.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa

from asd.baselines.autoencoder import AEConfig
from asd.io import layout, storage
from asd.recipes.recipe import Recipe
from asd.recipes.run import RecipeRun, Split, missing_files
from asd.recipes.split import plan_split
from asd.reports import metrics
from asd.resources import DeviceConfig
from asd.stages.embed import EmbedConfig
from asd.stages.featurize import FeaturizeConfig
from asd.stages.finetune import SingleClassError
from asd.stages.score import SCORE_SCHEMA, ScoreConfig
from asd.stores.features import KEY_COLUMNS, read_features_table

log = logging.getLogger(__name__)

BASELINES = {"ae_mse": "DCASE autoencoder baseline, MSE score",
             "ae_mahalanobis": "DCASE autoencoder baseline, selective Mahalanobis score"}
LOGMEL, AE = "logmel", "ae"  # the two front ends: the stored Kaldi features, the baseline's own
PER_TYPE_FACTS = ("train_clips", "train_clips_source", "train_clips_target", "train_vectors", "validation_vectors",
                  "steps", "first_loss", "final_loss", "final_val_loss", "loss_history", "seconds", "target_covariance",
                  "thresholds")  # what the report keeps of each type the autoencoder trained


@dataclass
class EvaluateConfig:
    recipes: list[Recipe] = field(default_factory=list)
    baselines: tuple[str, ...] = tuple(BASELINES)
    served: str | None = None  # the recipe the pipeline serves (marked in the report)
    derive_fraction: float = 0.5  # share of a section's normal test clips that forms a missing train split
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    plots: bool = True  # per-method ROC and histogram plots

    def __post_init__(self):
        self.baselines = tuple(self.baselines)
        names = [r.name for r in self.recipes] + list(self.baselines)
        if not names:
            raise ValueError("no recipes and no baselines to evaluate")
        if len(set(names)) != len(names):
            raise ValueError(f"methods listed twice: {names}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; known: {sorted(BASELINES)}")
        if not 0.0 < self.derive_fraction < 1.0:
            raise ValueError(f"derive_fraction must be in (0, 1), got {self.derive_fraction}")


class MethodUnavailable(ValueError):
    """A method's prerequisites are missing (raised before any work), or no method could run."""


@dataclass
class EvaluateResult:
    report_md: str
    report_json: str
    report_png: str
    official_scores: dict  # method -> official score (None when not computable)
    scores: dict  # method -> <root>/scores/<method>
    copies: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    input_uri: str,
    root: str,
    cfg: EvaluateConfig | None = None,
    *,
    name: str | None = None,
    config_snapshot: dict | None = None,
    report_to: str | None = None,
) -> EvaluateResult:
    """Run ``cfg.recipes`` and ``cfg.baselines`` on the corpus ``input_uri`` with one split; write
    every method's scores and the comparison report under ``root`` (and copies as
    ``<report_to>.{md,json,png}``)."""
    from asd.baselines.autoencoder import featurize_frontend
    from asd.recipes.report import write_evaluation_report
    from asd.stages.featurize import featurize

    cfg = cfg or EvaluateConfig()
    t0 = time.perf_counter()
    problems = missing_files(cfg.recipes)
    if problems:
        raise MethodUnavailable("; ".join(problems))
    storage.check_reachable(input_uri)
    needs = ({LOGMEL} if cfg.recipes else set()) | ({AE} if cfg.baselines else set())
    featurized = {}
    if LOGMEL in needs:
        featurized[LOGMEL] = featurize(input_uri, root, cfg.featurize).to_dict()
    if AE in needs:
        featurized[AE] = featurize_frontend(input_uri, root, cfg.ae, cfg.featurize).to_dict()
    keys = clip_keys(root, needs)
    plan = plan_split(keys, cfg.derive_fraction)
    if not plan.test_ids:
        raise ValueError(f"no test clips in {input_uri!r}: nothing to score")
    per_method: dict[str, dict] = {}
    not_run: dict[str, str] = {}  # method -> why it could not run on this corpus
    if cfg.baselines:
        per_method.update(_baselines(root, cfg, plan))
    if cfg.recipes:
        done, not_run = _recipes(root, cfg, plan)
        per_method.update(done)
    for m, d in per_method.items():
        scored = set(d["table"].column("clip_id").to_pylist())
        if scored & plan.train_ids:
            raise AssertionError(f"{m} scored training clips {sorted(scored & plan.train_ids)[:3]}")
        if scored != plan.test_ids:
            raise AssertionError(f"{m} scored {len(scored)} clips, the test set has {len(plan.test_ids)} "
                                 f"(missing e.g. {sorted(plan.test_ids - scored)[:3]})")
        if d["table"].schema != SCORE_SCHEMA:
            raise AssertionError(f"{m} returned scores in another schema: {d['table'].schema}")
    if not per_method:
        raise MethodUnavailable("no method could run on this corpus: "
                                + "; ".join(f"{m}: {why}" for m, why in not_run.items()))
    order = [b for b in cfg.baselines] + [r.name for r in cfg.recipes]
    per_method = {m: per_method[m] for m in order if m in per_method}
    written = write_evaluation_report(input_uri, root, cfg, name, config_snapshot, report_to, keys, plan, featurized,
                                      per_method, t0, not_run)
    return EvaluateResult(**written, official_scores={m: d["official_score"] for m, d in per_method.items()},
                          scores={m: d["scores"] for m, d in per_method.items()}, seconds=time.perf_counter() - t0)


def _method(title: str, res, table: pa.Table, seconds: float, info: dict) -> dict:
    return {"title": title, "scores": res.scores, "n_scored": res.n_scored, "official_score": res.official_score,
            "metrics": res.metrics, "seconds": round(seconds, 1), "info": info, "table": table,
            "result": metrics.evaluate_table(table)}


def _baselines(root: str, cfg: EvaluateConfig, plan) -> dict[str, dict]:
    """The autoencoder trained once on the split's training clips; each of its scores written as a method."""
    from asd.baselines.autoencoder import score_autoencoders, train_autoencoders
    from asd.stages.score import write_results

    t0 = time.perf_counter()
    log.info("=== baseline: the DCASE autoencoder ===")
    trained = train_autoencoders(layout.ae_root(root), root, cfg.ae, train_clips=sorted(plan.train_ids))
    scored = score_autoencoders(layout.ae_root(root), trained.models, sorted(plan.test_ids), cfg=cfg.ae)
    info = {"models": trained.models, "maha_reduction": cfg.ae.maha_reduction, "epochs": cfg.ae.epochs,
            "batch_size": cfg.ae.batch_size, "seconds": round(trained.seconds, 1),
            "per_type": {mt: {k: v for k, v in d.items() if k in PER_TYPE_FACTS} for mt, d in trained.per_type.items()}}
    out = {}
    for m in cfg.baselines:
        table, thresholds = scored[m]
        res = write_results(table, thresholds, layout.scores_dir(root, m), replace(cfg.score, plots=cfg.plots),
                            title=f"{m}: {BASELINES[m]}", features_root=layout.ae_root(root))
        out[m] = _method(BASELINES[m], res, table, time.perf_counter() - t0, info)
    return out


def _recipes(root: str, cfg: EvaluateConfig, plan) -> tuple[dict[str, dict], dict[str, str]]:
    """Every recipe through the stages on the split (training on a feature view of its training clips)."""
    from asd.stores.features import write_feature_view

    view = root  # nothing trains: no view
    if any(r.pretrain is not None or r.models for r in cfg.recipes):
        view = layout.train_view(root)
        write_feature_view(root, view, sorted(plan.train_ids), split="train", note="evaluation training split")
    runner = RecipeRun(root, Split(view, frozenset(plan.train_ids), frozenset(plan.test_ids)), embed=cfg.embed,
                       score=replace(cfg.score, plots=cfg.plots), device=cfg.device, fresh=True)
    out, not_run = {}, {}
    for recipe in cfg.recipes:
        t0 = time.perf_counter()
        log.info("=== recipe %s ===", recipe.name)
        try:
            res = runner.run(recipe)
        except SingleClassError as exc:  # e.g. section labels of a corpus with one type and one section
            log.warning("recipe %s not run: %s", recipe.name, exc)
            not_run[recipe.name] = f"not run: {exc}"
            continue
        table = storage.read_table(storage.join(res.score.scores, "scores.parquet"))
        info = res.to_dict()
        info.pop("score")
        out[recipe.name] = _method(recipe.title or recipe.name, res.score, table.cast(SCORE_SCHEMA),
                                   time.perf_counter() - t0, info)
    return out, not_run


def clip_keys(root: str, needs: set[str]) -> pa.Table:
    """The featurized clips of this corpus. A root is one corpus: featurize is incremental, so a
    root that also holds another corpus's clips (a second input into the same root) is refused."""
    bases = {kind: (root if kind == LOGMEL else layout.ae_root(root)) for kind in (LOGMEL, AE) if kind in needs}
    tables = {kind: read_features_table(base, columns=KEY_COLUMNS) for kind, base in bases.items()}
    for kind, t in tables.items():
        base = bases[kind]
        listed = set(storage.read_table(layout.manifest_uri(base), columns=["clip_id"]).column("clip_id").to_pylist())
        extra = sorted(set(t.column("clip_id").to_pylist()) - listed)
        if extra:
            raise ValueError(f"{layout.features_dir(base)!r} holds {len(extra)} clip(s) that are not in this input "
                             f"(e.g. {extra[:3]}): the root was used for another corpus; evaluate into a fresh "
                             "root (e.g. run=evaluate-<data name>)")
    sets = {k: set(t.column("clip_id").to_pylist()) for k, t in tables.items()}
    if len(sets) == 2 and sets[LOGMEL] != sets[AE]:
        only = sorted(sets[LOGMEL] ^ sets[AE])
        raise ValueError(f"the two front ends featurized different clips ({len(only)} differ, e.g. {only[:3]}); "
                         f"see the quarantine folders under {layout.features_dir(root)!r} and "
                         f"{layout.features_dir(layout.ae_root(root))!r}")
    keys = next(iter(tables.values()))
    if keys.num_rows == 0:
        raise ValueError(f"no featurized clips under {root!r}: nothing to evaluate")
    return keys


__all__ = ["BASELINES", "EvaluateConfig", "EvaluateResult", "MethodUnavailable", "clip_keys", "evaluate"]
