"""Scoring rules compared on the embeddings of one ``jobs.evaluate`` root (development seeds only).

    python -m benchmarks.score_variants <evaluate root> [--tags cnn mod ...]

Reads the embeddings that a ``jobs.evaluate`` run stored (``<root>/embeddings/<tag>``) and the
run's split (the same :func:`asd.recipes.split.plan_split` of its featurized clips), then scores the
test clips under several kNN rules without training anything again:

* ``raw``: the minimum over the source and target banks of the cosine kNN distance (k=1), as
  ``asd.stages.score`` scores today;
* ``bank_norm``: each bank's distance divided by the mean leave-one-out distance of that bank's own
  clips (``asd.algorithms.knn.MemoryBank`` with ``normalize="loo_mean"``), then the minimum;
* ``tag@a:b`` takes blocks ``a`` to ``b - 1`` of a tag that records blocks (e.g. ``fused@1:6``,
  the served recipe's five modulation CNNs without its log-mel CNN), with their recorded weights;
* for two or more tags, the same two rules on the members' summed scores (score-level fusion),
  and one kNN on the members' concatenation (embedding-level fusion). A tag whose embeddings
  record ``blocks`` (``concat`` with ``fusion: score``) is scored as :class:`asd.algorithms.knn.FusedBank`.

Used to choose the served recipe's scoring rule on development corpus seeds (10 and 11), never on
the seeds the accuracy record reports. Writes ``<out>.json`` and one line of text.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd.algorithms import knn
from asd.io.layout import embeddings_dir
from asd.reports import metrics
from asd.stores.embeddings import embedding_blocks, read_embeddings, vectors


def _tables(root: str, tag: str, train_ids: set[str], test_ids: set[str]) -> tuple[pa.Table, pa.Table]:
    t = read_embeddings(embeddings_dir(root, tag))
    ids = t.column("clip_id")
    return (t.filter(pc.is_in(ids, pa.array(sorted(train_ids), pa.string()))),
            t.filter(pc.is_in(ids, pa.array(sorted(test_ids), pa.string()))))


def _select_blocks(root: str, spec: str, train_ids: set[str], test_ids: set[str]
                   ) -> tuple[pa.Table, pa.Table, list[dict] | None]:
    """``tag`` or ``tag@a:b``: the tag's train and test rows and recorded blocks, or only its blocks
    ``a`` to ``b - 1`` (their columns of the embedding and their weights)."""
    tag, _, sel = spec.partition("@")
    train, test = _tables(root, tag, train_ids, test_ids)
    blocks = embedding_blocks(embeddings_dir(root, tag))
    if not sel:
        return train, test, blocks
    if not blocks:
        raise ValueError(f"{spec}: {tag} records no blocks to select from")
    a, b = (int(v) for v in sel.split(":"))
    if not 0 <= a < b <= len(blocks):
        raise ValueError(f"{spec}: {tag} has blocks 0..{len(blocks) - 1}")
    bounds = np.cumsum([0, *[blk["dim"] for blk in blocks]])
    lo, hi = int(bounds[a]), int(bounds[b])
    cut = [t.drop_columns(["embedding"]).append_column("embedding", _fixed(vectors(t)[:, lo:hi])) for t in (train, test)]
    return cut[0], cut[1], blocks[a:b]


def _smote(x: np.ndarray, per_clip: int, seed: int = 0, neighbours: int = 3) -> np.ndarray:
    """``per_clip`` synthetic rows per row of ``x``: a random point on the segment to one of its
    ``neighbours`` nearest rows (cosine), as SMOTE oversamples a small class."""
    if per_clip <= 0 or x.shape[0] < 2:
        return x[:0]
    rng = np.random.default_rng(seed)
    xn = knn.l2_normalize(x)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    near = np.argsort(-sim, axis=1)[:, :min(neighbours, x.shape[0] - 1)]
    out = []
    for i in range(x.shape[0]):
        for _ in range(per_clip):
            j = near[i, rng.integers(near.shape[1])]
            out.append(x[i] + rng.random() * (x[j] - x[i]))
    return np.asarray(out, x.dtype)


def _scores(train: pa.Table, test: pa.Table, normalize: str | None, k: int,
            blocks: list[dict] | None = None, condense: int | None = None, smote: int = 0) -> dict[str, np.ndarray]:
    """Scores of every test clip (in ``test``'s row order) under one rule: ``{"score": ...}``."""
    vec_tr, vec_te = vectors(train), vectors(test)
    keys_tr = list(zip(train.column("machine_type").to_pylist(), train.column("section").to_pylist()))
    keys_te = list(zip(test.column("machine_type").to_pylist(), test.column("section").to_pylist()))
    dom = train.column("domain").to_pylist()
    out = np.full(test.num_rows, np.inf, np.float32)
    for key in sorted(set(keys_te)):
        itr = [i for i, kk in enumerate(keys_tr) if kk == key]
        ite = np.array([i for i, kk in enumerate(keys_te) if kk == key])
        doms = [dom[i] for i in itr]
        x_tr = vec_tr[itr]
        if smote:
            tgt = np.array([str(d).lower() == "target" for d in doms])
            extra = _smote(x_tr[tgt], smote)
            x_tr, doms = np.vstack([x_tr, extra]), doms + ["target"] * len(extra)
        bank = (knn.FusedBank.build(x_tr, doms, blocks, normalize=normalize, k=k, condense_source=condense)
                if blocks else
                knn.MemoryBank.build(x_tr, doms, normalize=normalize, k=k, condense_source=condense))
        out[ite] = bank.score_parts(vec_te[ite], k=k)[0]
    return out


def _weighted_blocks(x: np.ndarray, blocks: list[dict] | None, weight: float) -> np.ndarray:
    """Each block L2-normalised and scaled by sqrt(weight x its block weight): one cosine kNN on the
    concatenation then weighs the members as score-level fusion would (embedding-level fusion)."""
    blocks = blocks or [{"dim": x.shape[1], "weight": 1.0}]
    bounds = np.cumsum([0, *[b["dim"] for b in blocks]])
    return np.hstack([np.sqrt(weight * b["weight"]) * knn.l2_normalize(x[:, a:e])
                      for b, a, e in zip(blocks, bounds[:-1], bounds[1:])])


def _fixed(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), x.shape[1])


def _official(test: pa.Table, score: np.ndarray) -> float:
    t = test.select(["clip_id", "machine_type", "section", "domain", "label"]).append_column(
        "score", pa.array(score.astype(np.float32)))
    return float(metrics.evaluate_table(t).official_score)


def main(argv: list[str] | None = None) -> dict:
    from asd.recipes.evaluate import LOGMEL, clip_keys
    from asd.recipes.split import plan_split

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--tags", nargs="+", default=["cnn", "mod"],
                   help="groups of embedding tags; a group 'a,b' scores the mean of its members")
    p.add_argument("--k", type=int, nargs="+", default=[1])
    p.add_argument("--condense", type=int, nargs="*", default=[],
                   help="also score with the source bank condensed to this many k-means centroids")
    p.add_argument("--smote", type=int, nargs="*", default=[],
                   help="also score with this many SMOTE points per target training clip in the target bank")
    p.add_argument("--weights", nargs="*", default=[],
                   help="more weighted sums of the groups' scores, one comma list per sum (e.g. 1,0.5)")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.txt")
    args = p.parse_args(argv)

    plan = plan_split(clip_keys(args.root, {LOGMEL}))
    rows: dict[str, float] = {}
    fused: dict[tuple[str, int], np.ndarray] = {}
    per_group: list[dict[tuple[str, int], np.ndarray]] = []
    weights = [[float(w) for w in ws.split(",")] for ws in args.weights]
    if any(len(w) != len(args.tags) for w in weights):
        raise ValueError(f"--weights: one weight per group ({len(args.tags)} groups)")
    test0 = train0 = None
    concat_parts: list[tuple[np.ndarray, np.ndarray]] = []
    blocks: dict[str, list[dict] | None] = {}  # recorded with each tag's embeddings
    for group in args.tags:  # "a,b,c": the members' mean score; the groups' scores are summed
        members = group.split(",")
        summed: dict[tuple[str, int], np.ndarray] = {}
        for tag in members:
            train, test, blocks[tag] = _select_blocks(args.root, tag, plan.train_ids, plan.test_ids)
            concat_parts.append(tuple(_weighted_blocks(vectors(t), blocks[tag], 1.0 / len(members))
                                      for t in (train, test)))
            if train0 is None:
                train0 = train
            if test0 is None:
                test0 = test
            elif test.column("clip_id") != test0.column("clip_id"):
                raise ValueError(f"{tag}: other test clips than {args.tags[0]}")
            for k in args.k:
                for rule, norm, cond, sm in (("raw", None, None, 0), ("bank_norm", "loo_mean", None, 0),
                                             *((f"condense{c}", None, c, 0) for c in args.condense),
                                             *((f"smote{m}", None, None, m) for m in args.smote)):
                    s = _scores(train, test, norm, k, blocks[tag], cond, sm)
                    summed[(rule, k)] = summed.get((rule, k), 0) + s / len(members)
        for (rule, k), s in summed.items():
            rows[f"{group if len(members) == 1 else 'mean(' + group + ')'} {rule} k={k}"] = _official(test0, s)
            fused[(rule, k)] = fused.get((rule, k), 0) + s
        per_group.append(summed)
    if len(args.tags) > 1:
        for (rule, k), s in fused.items():
            rows[f"sum of {len(args.tags)} groups {rule} k={k}"] = _official(test0, s)
            for w in weights:
                ws = sum(wi * g[(rule, k)] for wi, g in zip(w, per_group))
                rows[f"sum w={','.join(map(str, w))} {rule} k={k}"] = _official(test0, ws)
    if len(args.tags) > 1 or any(blocks.values()):
        # embedding-level fusion: every member L2-normalised, weighted so that each group counts once
        tr = train0.drop_columns(["embedding"]).append_column("embedding", _fixed(np.hstack([a for a, _ in concat_parts])))
        te = test0.drop_columns(["embedding"]).append_column("embedding", _fixed(np.hstack([b for _, b in concat_parts])))
        for k in args.k:
            rows[f"concat of {len(args.tags)} groups raw k={k}"] = _official(test0, _scores(tr, te, None, k))
    line = f"{args.root}: " + "; ".join(f"{name} {100 * v:.2f}" for name, v in rows.items())
    print(line)
    result = {"root": args.root, "split_sha256": plan.sha256(), "official_scores": rows, "line": line}
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        with open(args.out + ".txt", "w") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
