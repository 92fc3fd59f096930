"""The evaluation split: one role per featurized clip, the same for every method of a run.

The split (:func:`plan_split`) is decided once, from the committed features, and is the
same for every method. Per machine type and section:

* clips of the ``train`` folders that are not labelled anomalous train the models and form the
  kNN banks (the scoring stage's rule); anomalous clips found there are excluded;
* clips of the ``test`` folders are scored;
* when a section has **no training clips** (a data set without a separate train split), a
  training split is formed deterministically from its normal test clips: per domain, the normal
  clips are ordered by the sha256 of their clip id and the first ``floor(n * derive_fraction)``
  (at most ``n - 1``, none when ``n < 2``) become training clips; they are never scored, and the
  anomalous clips and the other normals stay in the test set. The report lists every section
  where this happened. The data layer has no such rule of its own (the scoring stage needs a
  ``train`` folder per section and refuses a section without one);
* a clip whose audio bytes (``content_sha256``) equal a training clip's is excluded from the
  test set, so no method is scored on audio it was trained on, whatever the file is called.

The data checksum (:func:`data_sha256`) is the sha256 over the sorted
``clip_id<TAB>content_sha256`` lines of every featurized clip; the split checksum
(:meth:`SplitPlan.sha256`) the same over ``clip_id<TAB>role``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from asd.stores.features import KEY_COLUMNS

log = logging.getLogger(__name__)

TRAIN, TEST, EXCLUDED = "train", "test", "excluded"


@dataclass
class SplitPlan:
    """One role per featurized clip: ``train`` (trains models, forms banks), ``test`` (scored) or
    ``excluded``; ``reason`` says why. ``derived``: sections whose training split was formed from
    normal test clips."""

    table: pa.Table  # KEY_COLUMNS + role, reason
    derived: list[dict]
    derive_fraction: float

    def ids(self, role: str) -> set[str]:
        t = self.table.filter(pc.equal(self.table.column("role"), role))
        return set(t.column("clip_id").to_pylist())

    @property
    def train_ids(self) -> set[str]:
        return self.ids(TRAIN)

    @property
    def test_ids(self) -> set[str]:
        return self.ids(TEST)

    def excluded(self) -> list[dict]:
        t = self.table.filter(pc.equal(self.table.column("role"), EXCLUDED))
        return t.select(["clip_id", "reason"]).to_pylist()

    def counts(self) -> dict:
        """``{machine_type: {"train": n, "test": n, "test_normal": n, "test_anomaly": n, "excluded": n}}``."""
        out: dict = {}
        for r in self.table.select(["machine_type", "role", "label"]).to_pylist():
            c = out.setdefault(r["machine_type"], {TRAIN: 0, TEST: 0, "test_normal": 0, "test_anomaly": 0, EXCLUDED: 0})
            c[r["role"]] += 1
            if r["role"] == TEST and r["label"] in ("normal", "anomaly"):
                c[f"test_{r['label']}"] += 1
        return dict(sorted(out.items()))

    def sha256(self) -> str:
        return _lines_sha256(zip(self.table.column("clip_id").to_pylist(), self.table.column("role").to_pylist()))


def _lines_sha256(pairs) -> str:
    h = hashlib.sha256()
    for a, b in sorted((str(a), str(b)) for a, b in pairs):
        h.update(f"{a}\t{b}\n".encode())
    return h.hexdigest()


def _order_key(clip_id: str) -> str:
    return hashlib.sha256(clip_id.encode()).hexdigest()


def plan_split(keys: pa.Table, derive_fraction: float = 0.5) -> SplitPlan:
    """The evaluation split of the clips in ``keys`` (see the module docstring for the rule)."""
    if not 0.0 < derive_fraction < 1.0:
        raise ValueError(f"derive_fraction must be in (0, 1), got {derive_fraction}")
    missing = [c for c in KEY_COLUMNS if c not in keys.column_names]
    if missing:
        raise ValueError(f"clip table lacks column(s) {missing}")
    rows = keys.select(KEY_COLUMNS).to_pylist()
    if not rows:
        raise ValueError("no clips to evaluate")
    ids = [r["clip_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate clip ids in the clip table")
    role: dict[str, str] = {}
    reason: dict[str, str] = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["machine_type"], r["section"]), []).append(r)
        if r["split"] == "train":
            if r["label"] == "anomaly":
                role[r["clip_id"]], reason[r["clip_id"]] = EXCLUDED, "anomalous clip in the train split"
            else:
                role[r["clip_id"]], reason[r["clip_id"]] = TRAIN, "train split"
        else:
            role[r["clip_id"]], reason[r["clip_id"]] = TEST, "test split"
    derived = []
    for (mt, sec), group in sorted(groups.items()):
        if any(role[r["clip_id"]] == TRAIN for r in group):
            continue
        by_domain: dict[str, int] = {}
        for dom in sorted({r["domain"] or "source" for r in group}):
            normals = sorted((r for r in group if r["label"] == "normal" and (r["domain"] or "source") == dom),
                             key=lambda r: _order_key(r["clip_id"]))
            k = min(math.floor(len(normals) * derive_fraction), len(normals) - 1) if len(normals) >= 2 else 0
            for r in normals[:k]:
                role[r["clip_id"]] = TRAIN
                reason[r["clip_id"]] = f"derived training split ({dom} normal test clip)"
            if k:
                by_domain[dom] = k
        if not by_domain:
            raise ValueError(f"{mt} section {sec} has no training clips and fewer than 2 labelled normal test clips "
                             "in every domain: no training split can be formed from it")
        derived.append({"machine_type": mt, "section": sec, "train_clips": by_domain,
                        "test_clips_left": sum(1 for r in group if role[r["clip_id"]] == TEST)})
        log.warning("%s section %s has no train split: %s normal test clips form its training split (never scored)",
                    mt, sec, by_domain)
    train_sha = {}
    for r in rows:
        if role[r["clip_id"]] == TRAIN and r["content_sha256"]:
            train_sha.setdefault(r["content_sha256"], r["clip_id"])
    for r in rows:
        twin = train_sha.get(r["content_sha256"]) if r["content_sha256"] else None
        if role[r["clip_id"]] == TEST and twin is not None:
            role[r["clip_id"]] = EXCLUDED
            reason[r["clip_id"]] = f"same audio bytes as training clip {twin}"
            log.warning("excluding %s from the test set: same audio bytes as training clip %s", r["clip_id"], twin)
    table = keys.select(KEY_COLUMNS).append_column("role", pa.array([role[i] for i in ids], pa.string()))
    table = table.append_column("reason", pa.array([reason[i] for i in ids], pa.string())).sort_by("clip_id")
    return SplitPlan(table=table, derived=derived, derive_fraction=derive_fraction)


def data_sha256(keys: pa.Table) -> str:
    """sha256 over the sorted ``clip_id<TAB>content_sha256`` lines of ``keys``."""
    return _lines_sha256(zip(keys.column("clip_id").to_pylist(), keys.column("content_sha256").to_pylist()))
