"""Scoring: kNN distance of test embeddings to normal training embeddings, with Ray Data.

For every (machine type, section) a :class:`asd.algorithms.knn.MemoryBank` holds the
training (normal) embeddings, split into a source and a target bank; a test
clip's score is the minimum over the two banks of its cosine kNN distance. The
banks are built on the driver, put in Ray's object store once, and each worker
that runs scoring tasks fetches them once per run (not per batch). Decision thresholds come from
leave-one-out scores of the training clips (gamma fit, as the DCASE baseline).

Outputs under ``<root>/scores/<tag>/`` (published with ``_SUCCESS``)::

    scores.parquet                          every test clip: score, per-bank scores, decision
    anomaly_score_<type>_section_<ss>_test.csv, decision_result_<type>_section_<ss>_test.csv
    thresholds.json
    metrics.json, report.md, roc.png, histograms.png   (when test labels exist)
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd.algorithms import knn
from asd.algorithms.thresholds import fit_threshold

# asd.reports.metrics and asd.reports.plots (scipy.stats, sklearn, matplotlib: ~1.2 s of imports) are imported
# where results are written, not here: every scoring worker imports this module.
from asd.io import commitlog, layout, storage
from asd.reports.triage import PageConfig
from asd.resources import require as require_resources
from asd.stores.embeddings import embedding_blocks, read_embeddings, vectors

log = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("machine_type", pa.string()),
        ("section", pa.string()),
        ("domain", pa.string()),
        ("label", pa.string()),
        ("score", pa.float32()),
        ("score_source", pa.float32()),
        ("score_target", pa.float32()),
        ("threshold", pa.float32()),
        ("decision", pa.int8()),
        # the training clip the score came from (the nearest normal clip, asd.algorithms.knn's
        # score_nearest); null where there is none: a condensed source bank's centroid, or a
        # scorer without neighbours (the autoencoder)
        ("neighbour_clip_id", pa.string()),
    ]
)


@dataclass
class ScoreConfig:
    k: int = 1
    condense_source: int | None = None  # k-means centroids for the source bank (None: exact)
    normalize: str | None = None  # None | loo_mean: each bank's distances over its clips' mean leave-one-out distance
    threshold_method: str = "gamma"  # gamma | percentile
    threshold_q: float = 0.9
    threshold_sample: int = 2000  # leave-one-out training scores per domain used for the threshold fit
    batch_size: int = 256
    concurrency: int | None = None  # most scoring tasks at once (None: as many as the CPUs allow)
    num_cpus: float = 0.5
    num_gpus: float = 0.0  # per scoring task; > 0: the kNN products run on the task's GPU (torch)
    plots: bool = True  # ROC, histograms and the triage page (report/index.html)
    progress: bool = True
    page: PageConfig = field(default_factory=PageConfig)  # the triage page of a scoring run and of every night


@dataclass
class ScoreResult:
    scores: str
    n_scored: int
    official_score: float | None
    metrics: dict | None
    report: str | None
    seconds: float
    sensor_faults: dict | None = None  # test clips with a sensor fault (and per fault); None: no feature store named
    page: str | None = None  # the triage page

    def to_dict(self) -> dict:
        return asdict(self)


Group = tuple[str, str]


def build_banks(train: pa.Table, cfg: ScoreConfig,
                blocks: list[dict] | None = None) -> tuple[dict[Group, knn.MemoryBank], dict[Group, float]]:
    """Memory banks and decision thresholds per (machine type, section) from training embeddings.

    ``blocks`` (recorded with the embeddings, :func:`asd.stores.embeddings.embedding_blocks`): score-level
    fusion of the members, a :class:`asd.algorithms.knn.FusedBank` per group; ``None``: one bank per group."""
    banks: dict[Group, knn.MemoryBank] = {}
    thresholds: dict[Group, float] = {}
    vec = vectors(train)
    ids = train.column("clip_id").to_pylist()
    mt = train.column("machine_type").to_pylist()
    sec = train.column("section").to_pylist()
    dom = train.column("domain").to_pylist()
    groups: dict[Group, list[int]] = {}
    for i, key in enumerate(zip(mt, sec)):
        groups.setdefault(key, []).append(i)
    for key, idx in sorted(groups.items()):
        e, d, names = vec[idx], [dom[i] for i in idx], [ids[i] for i in idx]
        if blocks:
            bank = knn.FusedBank.build(e, d, blocks, condense_source=cfg.condense_source, normalize=cfg.normalize,
                                       k=cfg.k, ids=names)
        else:
            bank = knn.MemoryBank.build(e, d, condense_source=cfg.condense_source, normalize=cfg.normalize, k=cfg.k,
                                        ids=names)
        banks[key] = bank
        train_scores = bank.train_scores(e, d, k=cfg.k, sample=cfg.threshold_sample)
        finite = train_scores[np.isfinite(train_scores)]
        if len(finite) >= 1:
            thresholds[key] = float(fit_threshold(finite, method=cfg.threshold_method, q=cfg.threshold_q))
        else:
            log.warning("%s section %s: a single training clip; no threshold (every clip decided normal)", *key)
            thresholds[key] = float("inf")
    return banks, thresholds


# Banks fetched by this worker process, by object id: a worker gets them from the object store
# once per scoring run (once per node over the network), not per batch. One entry: a new run's
# banks replace the last run's.
_WORKER_BANKS: dict[str, dict] = {}
_ONE_BLAS_THREAD: list = []


def _worker_banks(ref) -> dict:
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _WORKER_BANKS:
        _WORKER_BANKS.clear()
        _WORKER_BANKS[key] = ray.get(ref)
    return _WORKER_BANKS[key]


def _score_udf(batch: pa.Table, banks_ref: list, thresholds: dict, k: int, device: str = "cpu") -> pa.Table:
    """Ray Data task function: score one batch against the banks this worker holds."""
    if not _ONE_BLAS_THREAD:
        from threadpoolctl import threadpool_limits

        # one BLAS thread per task: tasks are the parallelism (no oversubscription)
        _ONE_BLAS_THREAD.append(threadpool_limits(limits=1))
    return score_table(batch, _worker_banks(banks_ref[0]), thresholds, k, device=_task_device(device))


def _task_device(device: str) -> str:
    """``"gpu"``: the GPU Ray gave this task (an error when it has none); else ``"cpu"``."""
    if device != "gpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("score.num_gpus > 0 but this scoring task sees no CUDA device")
    return "cuda"


def score_table(batch: pa.Table, banks: dict, thresholds: dict, k: int, device: str = "cpu") -> pa.Table:
    """Score rows of an embeddings table (the work of one batch); ``device``: where the kNN
    products run (``"cpu"``: numpy/BLAS; ``"cuda"``: torch)."""
    vec = vectors(batch)
    keys = list(zip(batch.column("machine_type").to_pylist(), batch.column("section").to_pylist()))
    n = batch.num_rows
    score = np.full(n, np.inf, np.float32)
    s_src = np.full(n, np.inf, np.float32)
    s_tgt = np.full(n, np.inf, np.float32)
    neighbour: list = [None] * n
    for key in sorted(set(keys)):
        if key not in banks:
            raise KeyError(f"no training clips for machine type {key[0]!r} section {key[1]!r}: cannot score it")
        idx = np.array([i for i, kk in enumerate(keys) if kk == key])
        score[idx], s_src[idx], s_tgt[idx], names = banks[key].score_nearest(vec[idx], k=k, device=device)
        for i, name in zip(idx, names):
            neighbour[i] = name
    thr = np.array([thresholds.get(kk, np.inf) for kk in keys], np.float32)
    return pa.table(
        {
            "clip_id": batch.column("clip_id"),
            "machine_type": batch.column("machine_type"),
            "section": batch.column("section"),
            "domain": batch.column("domain"),
            "label": batch.column("label"),
            "score": pa.array(score, pa.float32()),
            "score_source": pa.array(s_src, pa.float32()),
            "score_target": pa.array(s_tgt, pa.float32()),
            "threshold": pa.array(thr, pa.float32()),
            "decision": pa.array((score > thr).astype(np.int8), pa.int8()),
            "neighbour_clip_id": pa.array(neighbour, pa.string()),
        },
        schema=SCORE_SCHEMA,
    )


def score_dataset(ds, banks: dict, thresholds: dict, cfg: ScoreConfig) -> pa.Table:
    """Score a Ray Dataset of embedding rows in Ray tasks; the banks travel once per worker.

    The banks go into the object store once; each task names them by reference and its worker
    keeps them (zero-copy on the node) for the run's later tasks. Tasks rather than an actor pool:
    an actor is a new process per run (0.5-1 s before its first batch, on every run), while tasks
    reuse the cluster's running workers (``benchmarks/score.py``).
    """
    import ray
    from ray.data import TaskPoolStrategy

    require_resources({"CPU": cfg.num_cpus, "GPU": cfg.num_gpus}, 1, "scoring",
                      hint="Set score.num_cpus or score.num_gpus to what the cluster has.")
    banks_ref = ray.put(banks)
    ds = ds.map_batches(
        _score_udf,
        fn_kwargs=dict(banks_ref=[banks_ref], thresholds=thresholds, k=cfg.k,
                       device="gpu" if cfg.num_gpus > 0 else "cpu"),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=TaskPoolStrategy(size=cfg.concurrency) if cfg.concurrency else None,
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus or None,
    )
    return storage.collect_tables(ds, SCORE_SCHEMA).sort_by("clip_id")




def training_embeddings(embeddings_uri: str) -> pa.Table:
    """The normal training clips of an embeddings folder: the rows that form the memory banks."""
    train = read_embeddings(embeddings_uri, filter=pc.field("split") == "train")
    return train.filter(pc.invert(pc.fill_null(pc.equal(train.column("label"), "anomaly"), False)))


def write_dcase_csvs(out_dir: str, table: pa.Table) -> None:
    """DCASE anomaly_score_* and decision_result_* files, one pair per machine type and section."""
    from asd.reports import metrics

    rows = table.select(["clip_id", "machine_type", "section", "score", "decision"]).to_pylist()
    for mt, sec in sorted({(r["machine_type"], r["section"]) for r in rows}):
        group = [r for r in rows if r["machine_type"] == mt and r["section"] == sec]
        metrics.write_result_csvs(
            out_dir, mt, sec,
            [posixpath.basename(r["clip_id"]) for r in group],
            [r["score"] for r in group],
            [int(r["decision"]) for r in group],
        )


def score(
    embeddings_uri: str,
    out_uri: str,
    cfg: ScoreConfig | None = None,
    title: str | None = None,
    train_ids=None,
    test_ids=None,
) -> ScoreResult:
    """Score the test clips of an embeddings folder against its training clips; write results.

    By default the banks hold the normal clips of the train folders and the clips of the test
    folders are scored; ``train_ids`` and ``test_ids`` name both sets instead (an evaluation's split,
    :func:`asd.recipes.split.plan_split`)."""
    import ray
    import ray.data
    from ray.data import DataContext

    cfg = cfg or ScoreConfig()
    t0 = time.perf_counter()
    storage.require_published(embeddings_uri)
    if train_ids is None:
        train = training_embeddings(embeddings_uri)
    else:
        train = read_embeddings(embeddings_uri, filter=pc.field("clip_id").isin(pa.array(sorted(train_ids), pa.string())))
    if train.num_rows == 0:
        raise ValueError(f"{embeddings_uri!r} has no normal training clips: nothing to score against")
    banks, thresholds = build_banks(train, cfg, embedding_blocks(embeddings_uri))

    if not ray.is_initialized():
        ray.init()
    DataContext.get_current().enable_progress_bars = cfg.progress
    if test_ids is None:
        from ray.data.expressions import col

        afs, path = storage.arrow_filesystem(embeddings_uri)
        test = ray.data.read_parquet(path, filesystem=afs).filter(expr=col("split") == "test")
    else:
        rows = read_embeddings(embeddings_uri, filter=pc.field("clip_id").isin(pa.array(sorted(test_ids), pa.string())))
        bs = max(1, cfg.batch_size)
        test = ray.data.from_arrow([rows.slice(i, bs) for i in range(0, rows.num_rows, bs)] or [rows])
    scores = score_dataset(test, banks, thresholds, cfg)
    return write_results(scores, thresholds, out_uri, cfg, title=title, t0=t0,
                         features_root=layout.root_of_embeddings(embeddings_uri))


def write_results(
    scores: pa.Table,
    thresholds: dict[Group, float],
    out_uri: str,
    cfg: ScoreConfig,
    title: str | None = None,
    t0: float | None = None,
    features_root: str | None = None,
) -> ScoreResult:
    """Write scores, DCASE CSVs, thresholds, metrics, report, plots and the triage page; publish the folder.

    ``features_root``: the root whose features hold the scored clips (their sensor faults, recordings
    and spectrograms for the report and the page); None: the report counts no sensor faults and the
    page has no media."""
    from asd.reports import metrics, plots, tables
    from asd.stages import triage

    t0 = t0 if t0 is not None else time.perf_counter()
    staging = storage.staging_dir(out_uri)
    storage.write_table(storage.join(staging, "scores.parquet"), scores)
    write_dcase_csvs(staging, scores)
    rows = scores.to_pylist()
    storage.atomic_write_json(
        storage.join(staging, "thresholds.json"),
        {f"{mt}/section_{sec}": v for (mt, sec), v in sorted(thresholds.items())},
    )
    with_faults = None
    if features_root is not None:
        with_faults = triage.with_faults(scores, triage.clip_facts(features_root, scores.column("clip_id").to_pylist()))
    counted = triage.counts(with_faults) if with_faults is not None else None
    labelled = [r for r in rows if r["label"] in ("normal", "anomaly")]
    result_metrics, official, report_uri = None, None, None
    files, figures = ["scores.parquet", "thresholds.json"], []
    if labelled:
        m = metrics.evaluate(
            [r["machine_type"] for r in labelled], [r["section"] for r in labelled],
            [r["domain"] for r in labelled], [r["label"] for r in labelled], [r["score"] for r in labelled],
        )
        result_metrics = m.to_dict()
        official = None if not np.isfinite(m.official_score) else float(m.official_score)
        storage.atomic_write_json(storage.join(staging, "metrics.json"), result_metrics)
        md = tables.metrics_markdown(m, title=title) + _decisions_markdown(len(rows), scores, counted, cfg)
        storage.atomic_write_text(storage.join(staging, "report.md"), md + "\n")
        report_uri = storage.join(out_uri, "report.md")
        files += ["report.md", "metrics.json"]
        if cfg.plots:
            cols = ([r["machine_type"] for r in labelled], [r["domain"] for r in labelled],
                    [r["label"] for r in labelled], [r["score"] for r in labelled])
            plots.plot_roc(storage.join(staging, "roc.png"), *cols)
            thr_by_type = {mt: v for (mt, _), v in thresholds.items() if np.isfinite(v)}
            plots.plot_score_histograms(storage.join(staging, "histograms.png"), *cols, threshold=thr_by_type)
            figures += ["roc.png", "histograms.png"]
    page = None
    if cfg.plots and cfg.page.enabled:
        from asd.reports.triage import write_page

        built = triage.run_page(with_faults if with_faults is not None else scores, features_root,
                                f"Scoring run: {title or out_uri}", cfg.page, cfg.condense_source is not None,
                                files, figures)
        write_page(storage.join(staging, triage.REPORT_DIR), built, cfg.page)
        page = storage.join(out_uri, triage.REPORT_DIR, "index.html")
    commitlog.publish_dir(staging, out_uri, {"rows": len(rows), "official_score": official})
    elapsed = time.perf_counter() - t0
    log.info("scored %d test clips into %s in %.1f s (official score %s)", len(rows), out_uri, elapsed,
             "n/a" if official is None else f"{100 * official:.2f} %")
    return ScoreResult(scores=out_uri, n_scored=len(rows), official_score=official, metrics=result_metrics,
                       report=report_uri, seconds=elapsed, page=page,
                       sensor_faults=None if counted is None else counted["sensor_faults"])


def _decisions_markdown(n: int, scores: pa.Table, counted: dict | None, cfg: ScoreConfig) -> str:
    """The report's lines on decisions: anomalies above threshold, sensor faults apart."""
    above = int(np.asarray(scores.column("decision").to_numpy(zero_copy_only=False)).sum()) if n else 0
    if counted is None:
        return f"\nDecisions: {above} of {n} test clips above their threshold (no feature store named: no sensor checks).\n"
    faults = counted["sensor_faults"]
    kinds = ", ".join(f"{k} {v}" for k, v in faults.items() if k != "clips") or "none"
    page = " (listed on report/index.html)" if cfg.plots and cfg.page.enabled else ""
    return (f"\nDecisions: {counted['anomalies']} of {n} test clips are anomalies above their threshold without a "
            f"sensor fault ({above} above it in all); **sensor faults: {faults['clips']}** ({kinds}), scored like "
            f"the others and counted apart{page}.\n")
