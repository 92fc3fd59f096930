"""Pseudo-attribute labels: Ward clustering (:mod:`asd.algorithms.ward`) of normal training embeddings, one
Ray task per machine type.

Machine attribute labels are often missing. Following arXiv 2509.12845 the normal
training clips of a machine type get *pseudo-attribute* labels from agglomerative
clustering with Ward linkage of their (L2-normalised) embeddings: the paper clusters its
pre-trained encoder's, the served recipe log-mel statistics (a recipe's ``labels.clustered``).

The stage :func:`pseudo_label` reads the training clips of an embeddings folder (``split ==
"train"`` normal clips, or the ``clip_ids`` of an evaluation's split), runs ONE Ray task per machine type (``num_cpus`` and
``memory`` requested explicitly; the task gets only that type's embeddings,
through the object store), and publishes ``<out>/`` atomically::

    labels.parquet          clip_id, machine_type, section, domain, pseudo_label, real_label, label
    clusters.json           per type: method, chosen n, cluster sizes, node id, seconds
    summary.json            counts, config, ARI/NMI of pseudo labels vs real attributes per type
    dendrogram_<type>.png   truncated Ward dendrogram (lastp)

:func:`attribute_labels` writes the same folder without clustering: section-only or real labels.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd.algorithms.ward import (
    WardConfig,
    cluster_type,
    cut_height,
    estimate_memory_gb,
    node_point_counts,
)
from asd.io import commitlog, layout, storage

log = logging.getLogger(__name__)


LABEL_SOURCES = ("pseudo", "real", "real_else_pseudo")
ATTRIBUTE_SOURCES = ("section", "domain", "real")  # labels without clustering (attribute_labels)


@dataclass
class PseudoLabelConfig(WardConfig):
    """The pseudo-label stage: Ward's settings (:class:`asd.algorithms.ward.WardConfig`), which labels
    to publish and what each per-type Ray task asks for.

    ``label_source``: ``pseudo`` (the clusters), ``real`` (the real attributes of the manifest) or
    ``real_else_pseudo`` (real attributes where a type has them). ``memory_gb=None`` requests an
    estimate per type (:func:`asd.algorithms.ward.estimate_memory_gb`, capped at the largest
    node's memory). ``resources`` adds custom Ray resources to the task of a type:
    ``{"<machine_type>": {"res": 1}, "*": {...}}`` (``"*"`` = every other type).
    """

    per_domain: bool = False  # cluster source and target separately
    label_source: str = "pseudo"  # pseudo | real | real_else_pseudo
    num_cpus: float = 1.0  # per machine-type task
    memory_gb: float | None = None  # per machine-type task; None: estimate
    resources: dict = field(default_factory=dict)  # machine_type (or "*") -> custom Ray resources
    dendrogram_leaves: int = 30

    def __post_init__(self):
        super().__post_init__()
        if self.label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source must be one of {LABEL_SOURCES}, got {self.label_source!r}")
        self.resources = {str(k): dict(v) for k, v in dict(self.resources or {}).items()}


LABELS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("machine_type", pa.string()),
        ("section", pa.string()),
        ("domain", pa.string()),
        ("pseudo_label", pa.int32()),
        ("real_label", pa.string()),
        ("label", pa.string()),
    ]
)



@dataclass
class PseudoLabelResult:
    labels: str  # the published output folder
    n_clips: int
    n_types: int
    types: dict  # machine_type -> method, n_clusters, sizes, node_id, seconds, ari, nmi, ...
    quality: dict  # machine_type -> {"ari", "nmi", ...} where real attributes exist
    label_source: str
    seconds: float

    @property
    def node_ids(self) -> dict[str, str]:
        return {t: info["node_id"] for t, info in self.types.items()}

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- #
# The Ray stage
# --------------------------------------------------------------------------- #
def _cluster_type_job(x: np.ndarray, domains: list | None, cfg: PseudoLabelConfig, name: str) -> dict:
    """Body of the per-type Ray task: cluster one machine type (per domain when ``domains`` is given)."""
    import ray
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    with threadpool_limits(limits=max(1, int(cfg.num_cpus))):
        labels = np.zeros(len(x), np.int32)
        groups: dict[str, np.ndarray] = {}
        if domains is None:
            groups["all"] = np.arange(len(x))
        else:
            keys = np.array(["none" if d is None else str(d) for d in domains])
            for key in sorted(set(keys.tolist())):
                groups[key] = np.flatnonzero(keys == key)
        parts = {}
        offset = 0
        for key, idx in groups.items():
            sub = x if len(idx) == len(x) else x[idx]
            res = cluster_type(sub, cfg, name=name if key == "all" else f"{name}/{key}")
            labels[idx] = res.labels + offset
            offset += max(res.n_clusters, 1)
            parts[key] = {**res.summary(), "linkage": res.linkage, "leaf_sizes": res.leaf_sizes}
    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # called outside Ray
        node_id = None
    return {"labels": labels, "parts": parts, "node_id": node_id, "seconds": time.perf_counter() - t0}


_REMOTE = None


def _remote_job():
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(_cluster_type_job)
    return _REMOTE


def _max_node_memory_gb() -> float | None:
    import ray

    try:
        mem = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
        return max(mem) / 2**30 if mem and max(mem) > 0 else None
    except Exception:
        return None


def attribute_string(attrs) -> str | None:
    """A clip's real attributes (``[(key, value), ...]``) as one label, ``"key=value|..."``; None without any."""
    if not attrs:
        return None
    return "|".join(f"{k}={v}" for k, v in attrs)


def _real_labels(manifest_uri: str | None, embeddings_uri: str) -> dict[str, str | None]:
    """clip_id -> "key=value|..." from the manifest's attributes (empty when there is no manifest)."""
    if manifest_uri is None:
        parent = embeddings_uri.rstrip("/").rsplit("/", 2)
        guess = layout.manifest_uri(parent[0]) if len(parent) == 3 else None
        if guess is None or not storage.exists(guess):
            log.info("no manifest next to %s: no real attribute labels", embeddings_uri)
            return {}
        manifest_uri = guess
    table = storage.read_table(manifest_uri, columns=["clip_id", "attributes"])
    return {c: attribute_string(a) for c, a in zip(table.column("clip_id").to_pylist(),
                                                table.column("attributes").to_pylist())}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)) or "_"


def _pseudo_string(machine_type: str, section: str | None, k: int) -> str:
    return f"{machine_type}_s{section}_c{k}" if section is not None else f"{machine_type}_c{k}"


def _dendrogram_png(uri: str, machine_type: str, parts: dict, cfg: PseudoLabelConfig) -> str:
    from matplotlib.figure import Figure
    from scipy.cluster.hierarchy import dendrogram

    from asd.reports.plots import save_figure

    fig = Figure(figsize=(max(6.0, 0.28 * cfg.dendrogram_leaves + 2), 3.6 * len(parts)))
    for i, (key, part) in enumerate(parts.items()):
        ax = fig.add_subplot(len(parts), 1, i + 1)
        Z = part["linkage"]
        label = "" if key == "all" else f" [{key}]"
        if len(Z) == 0:
            ax.text(0.5, 0.5, f"{part['n_points']} clip(s): one cluster ({part['warning'] or 'degenerate'})",
                    ha="center", va="center", transform=ax.transAxes, wrap=True)
            ax.set_axis_off()
        else:
            counts = node_point_counts(Z, part["leaf_sizes"])
            m = len(Z) + 1
            dendrogram(Z, truncate_mode="lastp", p=cfg.dendrogram_leaves, ax=ax,
                       color_threshold=cut_height(Z, part["n_clusters"]), above_threshold_color="grey",
                       leaf_label_func=lambda j: f"({counts[j]})" if j >= m or counts[j] > 1 else str(j),
                       leaf_rotation=90, leaf_font_size=7)
            ax.set_ylabel("Ward merge height")
        ax.set_title(f"{machine_type}{label}: {part['n_clusters']} cluster(s), {part['method']}, "
                     f"{part['n_points']} clips ({part['chosen_by']})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, uri)


def pseudo_label(embeddings_uri: str, out_uri: str, cfg: PseudoLabelConfig | None = None,
                 manifest_uri: str | None = None, clip_ids=None) -> PseudoLabelResult:
    """Pseudo-attribute labels of every machine type's normal training clips, one Ray task per type.

    ``manifest_uri`` (default: ``<root>/manifest/manifest.parquet`` when the
    embeddings live at ``<root>/embeddings/<tag>`` and it exists) supplies real
    attributes for ``real_label``, ``label_source`` and the ARI/NMI report.
    """
    import ray
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from asd.stores.embeddings import read_embeddings, vectors

    cfg = cfg or PseudoLabelConfig()
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init()
    storage.require_published(embeddings_uri)
    if clip_ids is None:
        train = (pc.field("split") == "train") & ((pc.field("label") == "normal") | pc.field("label").is_null())
    else:
        train = pc.field("clip_id").isin(pa.array(sorted(clip_ids), pa.string()))
    key_cols = ["clip_id", "machine_type", "section", "domain"]
    keys = read_embeddings(embeddings_uri, columns=key_cols + ["split", "label"], filter=train)
    types = sorted({t for t in keys.column("machine_type").to_pylist() if t is not None})
    if not types:
        raise ValueError(f"{embeddings_uri}: no normal training clips (split == 'train') to cluster")
    real = _real_labels(manifest_uri, embeddings_uri)

    real_types = {}
    for t in types:
        ids = keys.filter(pc.equal(keys.column("machine_type"), t)).column("clip_id").to_pylist()
        real_types[t] = all(real.get(c) is not None for c in ids)
    if cfg.label_source == "real" and not all(real_types.values()):
        missing = [t for t, ok in real_types.items() if not ok]
        raise ValueError(f"label_source='real' but clips of {missing} have no real attributes in the manifest")

    max_mem = _max_node_memory_gb()
    remote = _remote_job()
    futures, metas, requests = {}, {}, {}
    for t in types:
        table = read_embeddings(embeddings_uri, columns=key_cols + ["embedding"],
                                filter=train & (pc.field("machine_type") == t))
        x = vectors(table)
        meta = table.drop_columns(["embedding"])
        domains = meta.column("domain").to_pylist() if cfg.per_domain else None
        mem = cfg.memory_gb if cfg.memory_gb is not None else estimate_memory_gb(len(x), x.shape[1] if x.size else 0, cfg)
        if max_mem is not None and mem > max_mem:
            log.warning("%s: %.1f GiB wanted but the largest node offers %.1f GiB; requesting that", t, mem, max_mem)
            mem = max_mem
        res = dict(cfg.resources.get(t, cfg.resources.get("*", {})))
        ref = ray.put(x)
        del x
        opts = dict(num_cpus=cfg.num_cpus, memory=int(mem * 2**30), name=f"cluster:{t}")
        if res:
            opts["resources"] = res
        futures[t] = remote.options(**opts).remote(ref, domains, cfg, t)
        metas[t] = meta
        requests[t] = {"num_cpus": cfg.num_cpus, "memory_gb": mem, "resources": res}
    outs = dict(zip(futures, ray.get(list(futures.values()))))

    final = storage.staging_dir(out_uri)
    tables, type_info, quality = [], {}, {}
    try:
        for t in types:
            out, meta = outs[t], metas[t]
            for part in out["parts"].values():
                if part["warning"]:
                    log.warning("%s", part["warning"])
            pseudo = out["labels"]
            ids = meta.column("clip_id").to_pylist()
            sections = meta.column("section").to_pylist()
            reals = [real.get(c) for c in ids]
            pseudo_str = [_pseudo_string(t, s, int(k)) for s, k in zip(sections, pseudo)]
            use_real = cfg.label_source == "real" or (cfg.label_source == "real_else_pseudo" and real_types[t])
            tables.append(pa.table({
                "clip_id": ids, "machine_type": meta.column("machine_type"), "section": meta.column("section"),
                "domain": meta.column("domain"), "pseudo_label": pa.array(pseudo, pa.int32()),
                "real_label": pa.array(reals, pa.string()),
                "label": pa.array(reals if use_real else pseudo_str, pa.string()),
            }, schema=LABELS_SCHEMA))
            q = None
            have = [i for i, r in enumerate(reals) if r is not None]
            if len(have) >= 2:
                r_lab = [reals[i] for i in have]
                p_lab = pseudo[have]
                q = {"ari": float(adjusted_rand_score(r_lab, p_lab)),
                     "nmi": float(normalized_mutual_info_score(r_lab, p_lab)),
                     "n_real_classes": len(set(r_lab)), "n_pseudo_classes": int(len(np.unique(p_lab))),
                     "n_clips": len(have)}
                quality[t] = q
            parts = out["parts"]
            png = storage.join(final, f"dendrogram_{_safe_name(t)}.png")
            _dendrogram_png(png, t, parts, cfg)
            n_clusters = int(sum(max(p["n_clusters"], 1) for p in parts.values()))
            type_info[t] = {
                "n_clips": len(ids),
                "n_clusters": n_clusters,
                "method": "+".join(sorted({p["method"] for p in parts.values()})),
                "sizes": [int(c) for c in np.bincount(pseudo, minlength=n_clusters)] if len(pseudo) else [],
                "parts": {k: {kk: vv for kk, vv in p.items() if kk not in ("linkage", "leaf_sizes")}
                          for k, p in parts.items()},
                "label_from": "real" if use_real else "pseudo",
                "node_id": out["node_id"],
                "seconds": round(out["seconds"], 3),
                "request": requests[t],
                "dendrogram": f"dendrogram_{_safe_name(t)}.png",
                "ari": q["ari"] if q else None,
                "nmi": q["nmi"] if q else None,
            }
        labels = pa.concat_tables(tables).sort_by([("machine_type", "ascending"), ("clip_id", "ascending")])
        storage.write_table(storage.join(final, "labels.parquet"), labels)
        storage.atomic_write_json(storage.join(final, "clusters.json"), type_info)
        seconds = time.perf_counter() - t0
        summary = {
            "embeddings": embeddings_uri,
            "n_clips": labels.num_rows,
            "n_types": len(types),
            "label_source": cfg.label_source,
            "config": asdict(cfg),
            "types": {t: {k: v for k, v in info.items() if k != "parts"} for t, info in type_info.items()},
            "quality": quality,
            "mean_ari": float(np.mean([q["ari"] for q in quality.values()])) if quality else None,
            "mean_nmi": float(np.mean([q["nmi"] for q in quality.values()])) if quality else None,
            "seconds": round(seconds, 3),
        }
        storage.atomic_write_json(storage.join(final, "summary.json"), summary)
        commitlog.publish_dir(final, out_uri, {"rows": labels.num_rows, "types": types})
    except BaseException:
        try:
            storage.remove(final)
        except Exception:
            pass
        raise
    log.info("pseudo labels of %d clips (%d types) in %s in %.1f s", labels.num_rows, len(types), out_uri, seconds)
    return PseudoLabelResult(labels=out_uri, n_clips=labels.num_rows, n_types=len(types), types=type_info,
                             quality=quality, label_source=cfg.label_source, seconds=seconds)


def attribute_labels(features_root: str, out_uri: str, source: str, clip_ids=None) -> str:
    """Labels without clustering, in the same folder layout: ``section`` (no attribute: the classes
    are machine type and section), ``domain`` (no attribute: the clip's domain, so a type of one
    section still has two classes) or ``real`` (each clip's real attributes, as stored with its
    features). ``clip_ids``: the clips to label; None: the normal clips of the train folders."""
    from asd.stores.features import read_features_table

    if source not in ATTRIBUTE_SOURCES:
        raise ValueError(f"attribute labels are one of {ATTRIBUTE_SOURCES}, got {source!r}")
    if clip_ids is None:
        rows_filter = (pc.field("split") == "train") & ((pc.field("label") == "normal") | pc.field("label").is_null())
    else:
        rows_filter = pc.field("clip_id").isin(pa.array(sorted(clip_ids), pa.string()))
    keys = read_features_table(features_root, columns=["clip_id", "machine_type", "section", "domain", "attributes"],
                               filter=rows_filter).sort_by("clip_id")
    if keys.num_rows == 0:
        raise ValueError(f"{features_root}: no training clips to label")
    rows = []
    for r in keys.to_pylist():
        real = attribute_string(r["attributes"])
        rows.append({"clip_id": r["clip_id"], "machine_type": r["machine_type"], "section": r["section"],
                     "domain": r["domain"], "pseudo_label": None,
                     "label": {"real": real, "domain": r["domain"], "section": None}[source],
                     "real_label": real})
    stage = storage.staging_dir(out_uri)
    storage.write_table(storage.join(stage, "labels.parquet"), pa.Table.from_pylist(rows))
    commitlog.publish_dir(stage, out_uri, {"rows": len(rows), "label_source": source})
    log.info("%s labels of %d clips in %s", source, len(rows), out_uri)
    return out_uri
