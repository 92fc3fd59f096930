"""Tests for asd.algorithms.knn: cosine kNN scoring, source/target banks, thresholds."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
from scipy import stats

from asd.algorithms.knn import MemoryBank, knn_distance, l2_normalize
from asd.algorithms.thresholds import fit_threshold


def unit(deg: float) -> np.ndarray:
    """2-D unit vector at ``deg`` degrees."""
    rad = np.deg2rad(deg)
    return np.array([np.cos(rad), np.sin(rad)], dtype=np.float32)


def brute_force(queries, bank, k, exclude_self=False):
    """float64 numpy reference for knn_distance."""
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    dist = 1.0 - qn.astype(np.float64) @ bn.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(dist, np.inf)
    return np.sort(dist, axis=1)[:, :k].mean(axis=1)


def clustered(rng, n_clusters, per_cluster, dim, noise):
    centers = l2_normalize(rng.normal(size=(n_clusters, dim)))
    x = np.repeat(centers, per_cluster, axis=0)
    x = x + noise * rng.normal(size=x.shape)
    return l2_normalize(x), centers


# ----------------------------------------------------------------- l2_normalize
def test_l2_normalize_rows_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], atol=1e-7)
    np.testing.assert_allclose(l2_normalize(np.array([0.0, 5.0])), [0.0, 1.0])


# ------------------------------------------------------------------ knn_distance
def test_known_angles_k1_and_k2():
    lengths = np.array([[1], [2], [5], [0.5]], dtype=np.float32)  # not normalised on purpose
    bank = np.stack([unit(0), unit(30), unit(90), unit(180)]) * lengths
    queries = np.stack([unit(10), unit(100), unit(45)]) * 3.0  # not normalised on purpose
    cos = lambda a: np.cos(np.deg2rad(a))  # noqa: E731
    d1 = knn_distance(queries, bank, k=1)
    np.testing.assert_allclose(d1, [1 - cos(10), 1 - cos(10), 1 - cos(15)], atol=1e-6)
    d2 = knn_distance(queries, bank, k=2)
    expected2 = [
        1 - (cos(10) + cos(20)) / 2,  # 0 and 30 degrees
        1 - (cos(10) + cos(70)) / 2,  # 90 and 30 degrees (180 is 80 away)
        1 - (cos(15) + cos(45)) / 2,  # 30 and 0/90 degrees (both 45 away)
    ]
    np.testing.assert_allclose(d2, expected2, atol=1e-6)
    assert d1.dtype == np.float32


def test_identical_and_opposite_vectors():
    bank = np.array([[1.0, 0.0]], dtype=np.float32)
    d = knn_distance(np.array([[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), bank)
    np.testing.assert_allclose(d, [0.0, 2.0, 1.0], atol=1e-6)
    assert (d >= 0).all() and (d <= 2).all()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_chunking_invariance_and_brute_force(k):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(53, 16)).astype(np.float32)
    bank = rng.normal(size=(41, 16)).astype(np.float32)
    results = [knn_distance(queries, bank, k=k, chunk_size=c) for c in (1, 3, 10_000)]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(results[0], brute_force(queries, bank, k), atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_exclude_self_is_leave_one_out(k):
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(30, 8)).astype(np.float32)
    for chunk in (1, 4, 4096):
        got = knn_distance(bank, bank, k=k, exclude_self=True, chunk_size=chunk)
        np.testing.assert_allclose(got, brute_force(bank, bank, k, exclude_self=True), atol=1e-5)
    # without exclusion every row finds itself at distance 0
    np.testing.assert_allclose(knn_distance(bank, bank, k=1), 0.0, atol=1e-6)


def test_exclude_self_keeps_duplicates_at_other_indices():
    bank = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(knn_distance(bank, bank, exclude_self=True), [0.0, 0.0, 1.0], atol=1e-6)


def test_k_larger_than_bank_warns_and_uses_m():
    rng = np.random.default_rng(2)
    queries, bank = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    with pytest.warns(UserWarning, match="k=10"):
        got = knn_distance(queries, bank, k=10)
    np.testing.assert_allclose(got, brute_force(queries, bank, 3), atol=1e-5)
    with pytest.warns(UserWarning):
        got = knn_distance(bank, bank, k=5, exclude_self=True)
    np.testing.assert_allclose(got, brute_force(bank, bank, 2, exclude_self=True), atol=1e-5)


def test_empty_bank_and_empty_queries():
    d = knn_distance(np.ones((4, 3)), np.zeros((0, 3)))
    assert d.shape == (4,) and np.isinf(d).all()
    # a single-row bank has nobody left in leave-one-out mode
    assert np.isinf(knn_distance(np.ones((1, 3)), np.ones((1, 3)), exclude_self=True)).all()
    assert knn_distance(np.zeros((0, 3)), np.ones((2, 3))).shape == (0,)


def test_input_validation():
    with pytest.raises(ValueError, match="dimension"):
        knn_distance(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="exclude_self"):
        knn_distance(np.ones((2, 3)), np.ones((3, 3)), exclude_self=True)
    with pytest.raises(ValueError, match="k must"):
        knn_distance(np.ones((2, 3)), np.ones((3, 3)), k=0)
    with pytest.raises(ValueError, match="NaN"):
        knn_distance(np.array([[np.nan, 1.0]]), np.ones((3, 2)))
    with pytest.raises(ValueError, match="2-D"):
        knn_distance(np.ones(3), np.ones((3, 3)))


# ------------------------------------------------------------------- MemoryBank
def test_build_splits_domains_and_normalises():
    emb = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, -1.0]])
    bank = MemoryBank.build(emb, ["source", "target", None, "Target"])
    np.testing.assert_allclose(bank.source, l2_normalize(emb[[0, 2]]), atol=1e-7)
    np.testing.assert_allclose(bank.target, l2_normalize(emb[[1, 3]]), atol=1e-7)
    assert bank.source.dtype == bank.target.dtype == np.float32
    assert bank.n_source_clips == 2 and not bank.condensed
    assert bank.nbytes == 4 * 2 * 4
    with pytest.raises(ValueError, match="unknown domain"):
        MemoryBank.build(emb, ["source", "target", "other", None])
    with pytest.raises(ValueError, match="domain labels"):
        MemoryBank.build(emb, ["source"])


def test_target_bank_is_not_drowned_by_source():
    rng = np.random.default_rng(3)
    dim = 32
    target_dir = l2_normalize(rng.normal(size=(1, dim)))
    source = l2_normalize(rng.normal(size=(1000, dim)))
    target = l2_normalize(target_dir + 0.02 * rng.normal(size=(10, dim)))
    emb = np.concatenate([source, target])
    domains = ["source"] * 1000 + ["target"] * 10
    bank = MemoryBank.build(emb, domains)
    query = l2_normalize(target_dir + 0.02 * rng.normal(size=(1, dim)))
    by_bank = bank.score_by_bank(query, k=2)
    assert by_bank["target"][0] < 0.05 < 0.3 < by_bank["source"][0]
    score = bank.score_parts(query, k=2)[0]
    assert score[0] == pytest.approx(by_bank["target"][0])
    # condensing the source bank leaves the target bank (and this score) untouched
    condensed = MemoryBank.build(emb, domains, condense_source=16)
    assert condensed.target.shape == (10, dim)
    assert condensed.score_parts(query, k=2)[0][0] == pytest.approx(score[0])
    # min over banks for arbitrary queries
    queries = rng.normal(size=(20, dim))
    by_bank = bank.score_by_bank(queries, k=3)
    np.testing.assert_array_equal(bank.score_parts(queries, k=3)[0], np.minimum(by_bank["source"], by_bank["target"]))


def test_empty_target_bank():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(12, 6))
    bank = MemoryBank.build(emb, [None] * 12)
    assert bank.target.shape == (0, 6)
    queries = rng.normal(size=(5, 6))
    by_bank = bank.score_by_bank(queries)
    assert np.isinf(by_bank["target"]).all()
    np.testing.assert_allclose(bank.score_parts(queries)[0], brute_force(queries, emb, 1), atol=1e-5)


def test_condensation_to_centroids():
    rng = np.random.default_rng(5)
    emb, centers = clustered(rng, n_clusters=8, per_cluster=60, dim=16, noise=0.05)
    domains = ["source"] * len(emb)
    full = MemoryBank.build(emb, domains)
    small = MemoryBank.build(emb, domains, condense_source=8, seed=0)
    assert small.source.shape == (8, 16) and small.condensed and small.n_source_clips == 480
    np.testing.assert_allclose(np.linalg.norm(small.source, axis=1), 1.0, atol=1e-6)
    assert small.nbytes < full.nbytes
    queries = l2_normalize(np.repeat(centers, 3, axis=0) + 0.05 * rng.normal(size=(24, 16)))
    np.testing.assert_allclose(small.score_parts(queries)[0], full.score_parts(queries)[0], atol=0.02)
    # each centroid sits on one true cluster centre
    assert (knn_distance(centers, small.source) < 0.01).all()
    # deterministic for a fixed seed
    again = MemoryBank.build(emb, domains, condense_source=8, seed=0)
    np.testing.assert_array_equal(again.source, small.source)


def test_condensation_skipped_for_small_source_and_never_touches_target():
    rng = np.random.default_rng(6)
    emb = rng.normal(size=(15, 4))
    domains = ["source"] * 5 + ["target"] * 10
    bank = MemoryBank.build(emb, domains, condense_source=5)
    np.testing.assert_allclose(bank.source, l2_normalize(emb[:5]))
    assert bank.target.shape == (10, 4) and not bank.condensed
    bank = MemoryBank.build(emb, domains, condense_source=2)
    assert bank.source.shape == (2, 4) and bank.target.shape == (10, 4)
    with pytest.raises(ValueError):
        MemoryBank.build(emb, domains, condense_source=0)


def test_train_scores_leave_one_out():
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    domains = ["source"] * 30 + ["target"] * 10
    bank = MemoryBank.build(emb, domains)
    k = 2
    got = bank.train_scores(emb, domains, k=k)
    # reference: full pairwise distances, own domain without self, other domain in full
    src, tgt = emb[:30], emb[30:]
    expected = np.concatenate([
        np.minimum(brute_force(src, src, k, exclude_self=True), brute_force(src, tgt, k)),
        np.minimum(brute_force(tgt, tgt, k, exclude_self=True), brute_force(tgt, src, k)),
    ])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # no clip finds itself: all scores are clearly positive on random data
    assert (got > 1e-3).all()
    # interleaved domain order gives the same per-clip scores
    perm = rng.permutation(40)
    got_perm = bank.train_scores(emb[perm], [domains[i] for i in perm], k=k)
    np.testing.assert_allclose(got_perm, got[perm], atol=1e-6)
    with pytest.raises(ValueError, match="built from"):
        bank.train_scores(emb[:20], domains[:20])


def test_train_scores_with_condensed_source():
    rng = np.random.default_rng(8)
    emb, _ = clustered(rng, n_clusters=4, per_cluster=25, dim=8, noise=0.1)
    domains = ["source"] * 95 + ["target"] * 5
    bank = MemoryBank.build(emb, domains, condense_source=4)
    got = bank.train_scores(emb, domains)
    src, tgt = emb[:95], emb[95:]
    expected_src = np.minimum(brute_force(src, src, 1, exclude_self=True), brute_force(src, tgt, 1))
    expected_tgt = np.minimum(brute_force(tgt, tgt, 1, exclude_self=True), brute_force(tgt, bank.source, 1))
    np.testing.assert_allclose(got, np.concatenate([expected_src, expected_tgt]), atol=1e-5)


def test_pickle_round_trip():
    """Scoring ships the banks through Ray's object store (pickle)."""
    rng = np.random.default_rng(9)
    emb = rng.normal(size=(50, 8))
    bank = MemoryBank.build(emb, ["source"] * 45 + ["target"] * 5, condense_source=10, normalize="loo_mean")
    queries = rng.normal(size=(7, 8))
    other = pickle.loads(pickle.dumps(bank))
    np.testing.assert_array_equal(other.source, bank.source)
    np.testing.assert_array_equal(other.target, bank.target)
    assert other.n_source_clips == 45 and other.condensed
    assert (other.source_scale, other.target_scale) == (bank.source_scale, bank.target_scale)
    np.testing.assert_array_equal(other.score_parts(queries)[0], bank.score_parts(queries)[0])


# -------------------------------------------------------------------- thresholds
def test_gamma_threshold_matches_true_quantile():
    rng = np.random.default_rng(10)
    shape, scale = 3.0, 0.05
    samples = stats.gamma.rvs(shape, scale=scale, size=3000, random_state=rng)
    true = stats.gamma.ppf(0.9, shape, scale=scale)
    assert fit_threshold(samples, "gamma", 0.9) == pytest.approx(true, rel=0.04)
    assert fit_threshold(samples, "gamma", 0.9, fix_loc=False) == pytest.approx(true, rel=0.06)
    assert fit_threshold(samples, q=0.5) == pytest.approx(stats.gamma.ppf(0.5, shape, scale=scale), rel=0.04)


def test_gamma_threshold_handles_non_positive_scores():
    rng = np.random.default_rng(11)
    samples = stats.gamma.rvs(4.0, scale=0.1, size=2000, random_state=rng)
    shifted = samples - 0.2  # some scores <= 0
    shifted[0] = 0.0
    thr = fit_threshold(shifted, "gamma", 0.9)
    assert np.isfinite(thr)
    assert thr == pytest.approx(np.quantile(shifted, 0.9), abs=0.05)


def test_percentile_threshold_is_exact_and_ignores_non_finite():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, np.inf, np.nan])
    assert fit_threshold(scores, "percentile", 0.9) == np.quantile([0.1, 0.2, 0.3, 0.4, 0.5], 0.9)
    assert fit_threshold(np.arange(11.0), "percentile", 0.5) == 5.0


@pytest.mark.parametrize(
    "scores",
    [np.array([0.3]), np.array([0.1, 0.4]), np.full(10, 0.25), np.array([0.2, 0.2, np.inf, np.nan])],
)
def test_gamma_degenerate_inputs_fall_back_to_percentile(scores, caplog):
    with caplog.at_level(logging.WARNING, logger="asd.algorithms.knn"):
        thr = fit_threshold(scores, "gamma", 0.9)
    finite = scores[np.isfinite(scores)]
    assert thr == pytest.approx(np.quantile(finite, 0.9))
    assert "empirical" in caplog.text


def test_threshold_errors():
    with pytest.raises(ValueError, match="no finite"):
        fit_threshold(np.array([np.inf, np.nan]))
    with pytest.raises(ValueError, match="unknown"):
        fit_threshold(np.ones(5), method="normal")
    with pytest.raises(ValueError, match="q must"):
        fit_threshold(np.ones(5), q=1.0)


def test_sampled_train_scores_equal_full_leave_one_out():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    domains = ["source"] * 280 + ["target"] * 20
    bank = MemoryBank.build(emb, domains)
    for k in (1, 3):
        full = bank.train_scores(emb, domains, k=k)
        part = bank.train_scores(emb, domains, k=k, sample=50, seed=1)
        picked = np.isfinite(part)
        assert picked[:280].sum() == 50 and picked[280:].all()  # target has 20 <= 50: all scored
        np.testing.assert_allclose(part[picked], full[picked], atol=1e-5)


# --------------------------------------------------------------- bank normalisation
def test_loo_mean_scales_put_a_sparse_target_bank_on_the_source_scale():
    rng = np.random.default_rng(3)
    # dense source bank (many clips, small gaps), sparse target bank (few clips, large gaps)
    e0, e1 = np.eye(16, dtype=np.float32)[:2]
    src = l2_normalize(e0 + 0.1 * rng.normal(size=(300, 16)).astype(np.float32))
    tgt = l2_normalize(e1 + 0.4 * rng.normal(size=(8, 16)).astype(np.float32))
    emb = np.vstack([src, tgt])
    domains = ["source"] * 300 + ["target"] * 8
    raw = MemoryBank.build(emb, domains)
    norm = MemoryBank.build(emb, domains, normalize="loo_mean")
    assert (raw.source_scale, raw.target_scale) == (1.0, 1.0)
    for bank, rows in ((norm.source_scale, src), (norm.target_scale, tgt)):
        assert bank == pytest.approx(brute_force(rows, rows, 1, exclude_self=True).mean(), rel=1e-4)
    assert norm.target_scale > 5 * norm.source_scale
    # a query is scored against each bank relative to that bank's own spread
    q = np.vstack([e0, e1])
    by_bank = norm.score_by_bank(q)
    raw_by_bank = raw.score_by_bank(q)
    np.testing.assert_allclose(by_bank["source"], raw_by_bank["source"] / norm.source_scale, rtol=1e-5)
    np.testing.assert_allclose(by_bank["target"], raw_by_bank["target"] / norm.target_scale, rtol=1e-5)
    # training scores (thresholds) are on the same scale as test scores
    loo = norm.train_scores(emb, domains)
    np.testing.assert_allclose(loo[:300].mean(), 1.0, atol=0.2)


def test_loo_mean_with_tiny_banks_and_sampled_large_banks(monkeypatch):
    rng = np.random.default_rng(4)
    emb = l2_normalize(rng.normal(size=(40, 8)).astype(np.float32))
    one_target = MemoryBank.build(emb, ["source"] * 39 + ["target"], normalize="loo_mean")
    assert one_target.target_scale == one_target.source_scale != 1.0  # no spread: the other bank's scale
    alone = MemoryBank.build(emb[:1], ["source"], normalize="loo_mean")
    assert (alone.source_scale, alone.target_scale) == (1.0, 1.0)
    full = MemoryBank.build(emb, ["source"] * 40, normalize="loo_mean", k=2)
    import asd.algorithms.knn as knn_mod

    monkeypatch.setattr(knn_mod, "SCALE_SAMPLE", 39)  # the sampled path on 39 of 40 rows
    sampled = MemoryBank.build(emb, ["source"] * 40, normalize="loo_mean", k=2)
    assert sampled.source_scale == pytest.approx(full.source_scale, rel=0.1)
    with pytest.raises(ValueError, match="normalize"):
        MemoryBank.build(emb, ["source"] * 40, normalize="zscore")
    with pytest.raises(ValueError, match="source_scale"):
        MemoryBank(source=emb, target=emb[:0], source_scale=0.0)


def test_fused_bank_sums_each_members_own_nearest_neighbour_distance():
    from asd.algorithms.knn import FusedBank

    rng = np.random.default_rng(6)
    a = rng.normal(size=(60, 8)).astype(np.float32)
    b = rng.normal(size=(60, 4)).astype(np.float32)
    emb = np.hstack([a, b])
    domains = ["source"] * 50 + ["target"] * 10
    fused = FusedBank.build(emb, domains, [{"dim": 8, "weight": 1.0}, {"dim": 4, "weight": 0.25}])
    qa, qb = rng.normal(size=(7, 8)).astype(np.float32), rng.normal(size=(7, 4)).astype(np.float32)
    bank_a, bank_b = MemoryBank.build(a, domains), MemoryBank.build(b, domains)
    score, src, tgt = fused.score_parts(np.hstack([qa, qb]))
    np.testing.assert_allclose(score, bank_a.score_parts(qa)[0] + 0.25 * bank_b.score_parts(qb)[0], rtol=1e-5)
    np.testing.assert_allclose(src, bank_a.score_by_bank(qa)["source"] + 0.25 * bank_b.score_by_bank(qb)["source"],
                               rtol=1e-5)
    np.testing.assert_allclose(tgt, bank_a.score_by_bank(qa)["target"] + 0.25 * bank_b.score_by_bank(qb)["target"],
                               rtol=1e-5)
    # not the same as one kNN on the concatenation: each member finds its own neighbour
    one = MemoryBank.build(np.hstack([l2_normalize(a), l2_normalize(b)]), domains)
    assert not np.allclose(score, one.score_parts(np.hstack([l2_normalize(qa), l2_normalize(qb)]))[0], rtol=1e-3)
    loo = fused.train_scores(emb, domains, sample=20, seed=1)
    expect = bank_a.train_scores(a, domains, sample=20, seed=1) + 0.25 * bank_b.train_scores(b, domains, sample=20,
                                                                                               seed=1)
    np.testing.assert_allclose(loo, expect, rtol=1e-5)  # the same sampled clips in every member (NaN elsewhere)
    assert np.isnan(loo).sum() == 30
    with pytest.raises(ValueError, match="do not add up"):
        FusedBank.build(emb, domains, [{"dim": 8, "weight": 1.0}])
    with pytest.raises(ValueError, match="dimension"):
        fused.score_parts(qa)


# ------------------------------------------------------- which training clip gave the score
@pytest.mark.parametrize(("k", "device"), [(1, "cpu"), (3, "cpu"), (1, "cpu:0"), (3, "cpu:0")])
def test_score_nearest_names_the_nearest_clip_of_the_winning_bank(k, device):
    rng = np.random.default_rng(11)
    emb = rng.normal(size=(40, 6)).astype(np.float32)
    domains = ["source"] * 30 + ["target"] * 10
    ids = [f"clip{i:02d}" for i in range(40)]
    bank = MemoryBank.build(emb, domains, ids=ids)
    q = rng.normal(size=(25, 6)).astype(np.float32)
    score, src, tgt, names = bank.score_nearest(q, k=k, device=device)
    np.testing.assert_array_equal(score, bank.score_parts(q, k=k, device=device)[0])  # the same scores as before
    np.testing.assert_allclose(src, bank.score_by_bank(q, k=k)["source"], rtol=1e-5)
    d = 1.0 - l2_normalize(q).astype(np.float64) @ l2_normalize(emb).astype(np.float64).T
    for i in range(len(q)):
        pool = range(30) if src[i] <= tgt[i] else range(30, 40)  # the bank that gave the minimum
        assert names[i] == ids[min(pool, key=lambda j: d[i, j])]
    assert {n[:4] for n in names} == {"clip"} and len({int(n[4:]) >= 30 for n in names}) == 2  # both banks win
    # without ids: positions of the training rows
    assert MemoryBank.build(emb, domains).score_nearest(q)[3] == [ids.index(n) for n in bank.score_nearest(q)[3]]


def test_a_condensed_source_bank_names_no_clip():
    rng = np.random.default_rng(12)
    emb = rng.normal(size=(40, 6)).astype(np.float32)
    domains = ["source"] * 30 + ["target"] * 10
    bank = MemoryBank.build(emb, domains, condense_source=4, ids=[f"c{i}" for i in range(40)])
    assert bank.condensed and bank.source_ids is None and len(bank.target_ids) == 10
    _, src, tgt, names = bank.score_nearest(rng.normal(size=(30, 6)).astype(np.float32))
    assert all((n is None) == (s <= t) for n, s, t in zip(names, src, tgt))
    assert all(n is None or int(n[1:]) >= 30 for n in names) and any(n is None for n in names)
    assert MemoryBank.build(emb[:0], []).score_nearest(emb[:2])[3] == [None, None]  # empty banks: nothing


def test_a_fused_bank_names_the_heaviest_members_nearest_clip():
    from asd.algorithms.knn import FusedBank

    rng = np.random.default_rng(13)
    a, b = rng.normal(size=(30, 5)).astype(np.float32), rng.normal(size=(30, 3)).astype(np.float32)
    domains = ["source"] * 24 + ["target"] * 6
    ids = [f"n{i}" for i in range(30)]
    fused = FusedBank.build(np.hstack([a, b]), domains, [{"dim": 5, "weight": 0.2}, {"dim": 3, "weight": 1.0}], ids=ids)
    qa, qb = rng.normal(size=(9, 5)).astype(np.float32), rng.normal(size=(9, 3)).astype(np.float32)
    *parts, names = fused.score_nearest(np.hstack([qa, qb]))
    for got, want in zip(parts, fused.score_parts(np.hstack([qa, qb]))):
        np.testing.assert_array_equal(got, want)
    assert names == MemoryBank.build(b, domains, ids=ids).score_nearest(qb)[3]  # member b weighs the most
    assert names != MemoryBank.build(a, domains, ids=ids).score_nearest(qa)[3]
