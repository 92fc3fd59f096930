"""Pseudo-attribute labels: exact vs chunked Ward, size-weighted Ward, cluster counts, the Ray stage."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from scipy.cluster.hierarchy import linkage
from sklearn.metrics import adjusted_rand_score

from asd.algorithms.ward import (
    WardConfig,
    choose_n_clusters,
    cluster_type,
    cut,
    ward_chunked,
    ward_exact,
    ward_weighted,
)
from asd.io import storage
from asd.stages.pseudo_label import PseudoLabelConfig, pseudo_label
from tests.pngs import assert_drawn_png

REPO = Path(__file__).resolve().parents[1]


def planted(n: int, k: int, d: int, noise: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` Gaussian blobs around random unit centres (unequal sizes), float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 4.0)))
    x = centres[y] + noise * rng.normal(size=(n, d)) / np.sqrt(d)
    return x.astype(np.float32), y


# --------------------------------------------------------------------------- #
# Ward trees
# --------------------------------------------------------------------------- #
def test_weighted_ward_with_unit_weights_equals_scipy_ward():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(250, 12))
    ref = linkage(x, "ward")
    ours = ward_weighted(x, np.ones(len(x)))
    np.testing.assert_allclose(ours[:, 2], ref[:, 2], rtol=1e-9, atol=1e-9)  # same merge heights
    np.testing.assert_array_equal(ours[:, [0, 1, 3]], ref[:, [0, 1, 3]])  # and the same tree
    # ward_exact = scipy Ward of the L2-normalised rows
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(ward_exact(x)[:, 2], linkage(xn, "ward")[:, 2], rtol=1e-9, atol=1e-9)


def test_weighted_ward_equals_ward_of_repeated_points():
    rng = np.random.default_rng(2)
    c = rng.normal(size=(40, 6))
    w = rng.integers(1, 5, size=40)
    ref = linkage(np.repeat(c, w, axis=0), "ward")
    ours = ward_weighted(c, w)
    # the top of the tree (above the zero-height merges of repeated points) is the same
    np.testing.assert_allclose(ours[:, 2], ref[-len(ours):, 2], rtol=1e-9)


def test_planted_clusters_exact_and_chunked_agree():
    x, y = planted(3000, 6, 64, noise=1.0, seed=3)
    exact = cluster_type(x, WardConfig(n_clusters=6))
    cfg = WardConfig(n_clusters=6, exact_max_points=500, n_micro=300, chunk_size=700, seed=0)
    chunked = cluster_type(x, cfg)
    assert (exact.method, chunked.method) == ("exact", "chunked")
    assert exact.n_clusters == chunked.n_clusters == 6
    assert adjusted_rand_score(exact.labels, chunked.labels) >= 0.9
    assert adjusted_rand_score(y, exact.labels) >= 0.9
    assert adjusted_rand_score(y, chunked.labels) >= 0.9
    assert sum(chunked.sizes) == len(x) and chunked.sizes == sorted(chunked.sizes, reverse=True)
    assert len(chunked.linkage) + 1 <= 300 and chunked.leaf_sizes.sum() == len(x)


def test_chunked_streams_arrays_callables_and_one_shot_iterators():
    x, y = planted(2000, 4, 32, noise=1.0, seed=4)
    cfg = WardConfig(n_micro=200, chunk_size=150)  # the first partial_fit buffers two chunks
    chunks = [x[i:i + 150] for i in range(0, len(x), 150)]
    for data in (x, lambda: iter(chunks), (c for c in chunks)):
        micro, centroids, sizes, Z = ward_chunked(data, cfg)
        assert micro.shape == (len(x),) and sizes.sum() == len(x) and len(centroids) == len(sizes) == len(Z) + 1
        # centroids are the exact means of the assigned (normalised) points
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        np.testing.assert_allclose(centroids[5], xn[micro == 5].mean(axis=0), atol=1e-5)
        assert adjusted_rand_score(y, cut(Z, 4)[micro]) >= 0.9
    # sorted input (e.g. source clips, then target): the fit samples rows at random, all blobs get centres
    order = np.argsort(y, kind="stable")
    micro, _, _, Z = ward_chunked(x[order], WardConfig(n_micro=100, chunk_size=150, kmeans_fit_rows=300))
    assert adjusted_rand_score(y[order], cut(Z, 4)[micro]) >= 0.9
    # fewer points than micro-clusters: every point is a leaf, i.e. exact Ward
    micro, _, sizes, Z = ward_chunked(x[:100], cfg)
    assert (sizes == 1).all()
    np.testing.assert_allclose(Z[:, 2], ward_exact(x[:100])[:, 2], rtol=1e-9)


@pytest.mark.parametrize("method", ["gap", "silhouette"])
@pytest.mark.parametrize("exact_max_points", [20_000, 500])
def test_automatic_cluster_count_recovers_planted_count(method, exact_max_points):
    for k, seed in ((6, 5), (3, 6)):
        x, y = planted(1500, k, 64, noise=1.0, seed=seed)
        cfg = WardConfig(auto_method=method, exact_max_points=exact_max_points, n_micro=250, chunk_size=800)
        res = cluster_type(x, cfg)
        assert res.n_clusters == k, (method, k, res.n_clusters)
        assert res.chosen_by == method
        assert adjusted_rand_score(y, res.labels) >= 0.9


def test_choose_and_cut_edges():
    Z = ward_exact(planted(40, 2, 8, seed=7)[0])
    assert choose_n_clusters(Z, WardConfig(auto_range=(2, 100))) <= 40
    assert choose_n_clusters(np.zeros((0, 4))) == 1
    assert cut(Z, 1).tolist() == [0] * 40
    assert len(np.unique(cut(Z, 500))) == 40  # capped at the number of leaves
    assert cluster_type(planted(40, 2, 8, seed=7)[0], WardConfig(n_clusters=999)).n_clusters == 40
    with pytest.raises(ValueError):
        WardConfig(auto_method="elbow")
    with pytest.raises(ValueError):
        PseudoLabelConfig(label_source="both")
    assert WardConfig(auto_range=[3, 5]).auto_range == (3, 5)


def test_degenerate_types_get_one_cluster_with_a_warning(caplog):
    rng = np.random.default_rng(8)
    with caplog.at_level(logging.WARNING, logger="asd.stages.pseudo_label"):
        res = cluster_type(rng.normal(size=(3, 16)), WardConfig(), name="tiny")
    assert res.n_clusters == 1 and res.labels.tolist() == [0, 0, 0] and res.method == "trivial"
    assert "tiny" in caplog.text and "3 clip" in caplog.text
    caplog.clear()
    same = np.tile(rng.normal(size=(1, 16)), (50, 1))
    with caplog.at_level(logging.WARNING, logger="asd.stages.pseudo_label"):
        res = cluster_type(same, WardConfig(n_clusters=4))
    assert res.n_clusters == 1 and set(res.labels.tolist()) == {0} and res.sizes == [50]
    assert "identical" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asd.stages.pseudo_label"):
        res = cluster_type(np.zeros((0, 16)), WardConfig())
    assert res.labels.shape == (0,) and "0 clip" in caplog.text


# --------------------------------------------------------------------------- #
# The Ray stage
# --------------------------------------------------------------------------- #
ATTRS = [[("speed", "1500"), ("load", "30")], [("speed", "1500"), ("load", "60")], [("speed", "3000"), ("load", "30")]]


def write_corpus_embeddings(root: str, seed: int = 9) -> dict:
    """<root>/embeddings/t (published) + <root>/manifest/manifest.parquet.

    ``fan``: 3 planted clusters = 3 real attribute values, source + target, plus test
    clips that must be ignored. ``valve``: 2 clusters, no attributes. ``pump``: 3 clips.
    """
    rows, vecs, attrs = [], [], []
    x, y = planted(180, 3, 24, noise=0.5, seed=seed)
    for i, (v, k) in enumerate(zip(x, y)):
        dom = "target" if i % 10 == 0 else "source"
        rows.append(("fan", "00", dom, "train", "normal", f"fan/train/c{i:04d}.wav"))
        vecs.append(v)
        attrs.append(ATTRS[k])
    for i, v in enumerate(planted(20, 3, 24, seed=seed + 1)[0]):
        rows.append(("fan", "00", "source", "test", "anomaly" if i % 2 else "normal", f"fan/test/c{i:04d}.wav"))
        vecs.append(v)
        attrs.append(ATTRS[0])
    for i, v in enumerate(planted(90, 2, 24, noise=0.5, seed=seed + 2)[0]):
        rows.append(("valve", "00", "source", "train", "normal", f"valve/train/c{i:04d}.wav"))
        vecs.append(v)
        attrs.append([])
    for i, v in enumerate(planted(3, 1, 24, seed=seed + 3)[0]):
        rows.append(("pump", "00", "source", "train", None, f"pump/train/c{i:04d}.wav"))
        vecs.append(v)
        attrs.append([])
    cols = list(zip(*rows))
    flat = pa.array(np.stack(vecs).astype(np.float32).reshape(-1), pa.float32())
    table = pa.table({
        "clip_id": list(cols[5]), "machine_type": list(cols[0]), "section": list(cols[1]), "domain": list(cols[2]),
        "split": list(cols[3]), "label": pa.array(cols[4], pa.string()),
        "content_sha256": [f"{i:064x}" for i in range(len(rows))],
        "embedding": pa.FixedSizeListArray.from_arrays(flat, 24),
    })
    emb = storage.join(root, "embeddings", "t")
    storage.write_table(storage.join(emb, "part-0.parquet"), table.slice(0, 150))
    storage.write_table(storage.join(emb, "part-1.parquet"), table.slice(150))
    storage.publish(emb)
    manifest = pa.table({"clip_id": list(cols[5]),
                         "attributes": pa.array(attrs, pa.map_(pa.string(), pa.string()))})
    storage.write_table(storage.join(root, "manifest", "manifest.parquet"), manifest)
    return {"embeddings": emb, "fan_truth": dict(zip(cols[5], [int(k) for k in y]))}


def _check_stage_output(out: str, res, made: dict) -> None:
    assert storage.is_published(out)
    labels = storage.read_table(storage.join(out, "labels.parquet")).to_pylist()
    assert len(labels) == res.n_clips == 180 + 90 + 3  # train normal clips only
    assert {r["machine_type"] for r in labels} == {"fan", "valve", "pump"}
    fan = [r for r in labels if r["machine_type"] == "fan"]
    assert adjusted_rand_score([made["fan_truth"][r["clip_id"]] for r in fan], [r["pseudo_label"] for r in fan]) >= 0.9
    assert {r["real_label"] for r in fan} == {"speed=1500|load=30", "speed=1500|load=60", "speed=3000|load=30"}
    valve = [r for r in labels if r["machine_type"] == "valve"]
    assert all(r["real_label"] is None and r["label"].startswith("valve_s00_c") for r in valve)
    pump = [r for r in labels if r["machine_type"] == "pump"]
    assert {r["pseudo_label"] for r in pump} == {0} and res.types["pump"]["method"] == "trivial"
    assert res.types["fan"]["n_clusters"] == 3 and res.types["valve"]["n_clusters"] == 2
    assert res.quality["fan"]["ari"] >= 0.9 and res.quality["fan"]["nmi"] >= 0.9
    assert set(res.quality) == {"fan"}  # only fan has real attributes
    summary = json.loads(storage.read_text(storage.join(out, "summary.json")))
    assert summary["quality"]["fan"]["ari"] == pytest.approx(res.quality["fan"]["ari"])
    clusters = json.loads(storage.read_text(storage.join(out, "clusters.json")))
    assert clusters["fan"]["method"] == "exact" and sum(clusters["fan"]["sizes"]) == 180
    for t in ("fan", "valve", "pump"):
        assert_drawn_png(storage.read_bytes(storage.join(out, f"dendrogram_{t}.png")))
    assert all(res.node_ids.values())


def test_pseudo_label_stage_end_to_end(ray_session, tmp_path):
    root = str(tmp_path / "run")
    made = write_corpus_embeddings(root)
    out = storage.join(root, "labels", "t")
    cfg = PseudoLabelConfig(memory_gb=0.25, label_source="real_else_pseudo", dendrogram_leaves=12)
    res = pseudo_label(made["embeddings"], out, cfg)
    _check_stage_output(out, res, made)
    labels = storage.read_table(storage.join(out, "labels.parquet")).to_pylist()
    # real_else_pseudo: fan has attributes on every clip -> real; valve and pump -> pseudo
    assert all(r["label"] == r["real_label"] for r in labels if r["machine_type"] == "fan")
    assert all(r["label"] == "pump_s00_c0" for r in labels if r["machine_type"] == "pump")
    assert res.types["fan"]["label_from"] == "real" and res.types["valve"]["label_from"] == "pseudo"

    # rerun per domain with pseudo labels: replaces the stage atomically; domains get distinct ids
    cfg = PseudoLabelConfig(memory_gb=0.25, per_domain=True, n_clusters=3)
    res = pseudo_label(made["embeddings"], out, cfg)
    labels = storage.read_table(storage.join(out, "labels.parquet")).to_pylist()
    fan = [r for r in labels if r["machine_type"] == "fan"]
    src = {r["pseudo_label"] for r in fan if r["domain"] == "source"}
    tgt = {r["pseudo_label"] for r in fan if r["domain"] == "target"}
    assert src and tgt and not (src & tgt)
    assert all(r["label"] == f"fan_s00_c{r['pseudo_label']}" for r in fan)
    assert set(res.types["fan"]["parts"]) == {"source", "target"}
    assert not [p for p in os.listdir(tmp_path / "run" / "labels") if p.startswith("_staging")]

    with pytest.raises(ValueError, match="real attributes"):
        pseudo_label(made["embeddings"], out, PseudoLabelConfig(memory_gb=0.25, label_source="real"))


@pytest.mark.s3
def test_pseudo_label_stage_on_s3(ray_session, s3_bucket):
    root = f"{s3_bucket}/run"
    made = write_corpus_embeddings(root)
    out = f"{root}/labels/t"
    res = pseudo_label(made["embeddings"], out, PseudoLabelConfig(memory_gb=0.25))
    _check_stage_output(out, res, made)


TWO_NODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from asd.stages.pseudo_label import PseudoLabelConfig, pseudo_label
    from tests.test_cluster import write_corpus_embeddings

    root = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head_node": 1}, "object_store_memory": 150 * 2**20,
        "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"worker_node": 1}, object_store_memory=150 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    head = [i for i, r in nodes.items() if "head_node" in r][0]
    worker = [i for i, r in nodes.items() if "worker_node" in r][0]
    made = write_corpus_embeddings(root)
    cfg = PseudoLabelConfig(memory_gb=0.1, resources={"fan": {"worker_node": 1}, "*": {"head_node": 1}})
    res = pseudo_label(made["embeddings"], root + "/labels/t", cfg)
    print(json.dumps({"head": head, "worker": worker, "nodes": res.node_ids,
                      "ari": res.quality["fan"]["ari"]}))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_per_type_tasks_run_on_the_requested_nodes_of_a_two_node_cluster(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", TWO_NODE_SCRIPT, str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["head"] != out["worker"]
    assert out["nodes"]["fan"] == out["worker"]
    assert out["nodes"]["valve"] == out["head"] and out["nodes"]["pump"] == out["head"]
    assert out["nodes"]["fan"] != out["nodes"]["valve"]
    assert out["ari"] >= 0.9
