"""The triage pages of nightly rescoring and of scoring runs, read as files (the browser test,
tests/test_triage_browser.py, opens them in Chromium): ranked anomalies with A/B audio, sensor faults
apart, counts in the summaries, and bad or odd nights (empty, all faults, a lost neighbour, S3, a
crash before publishing)."""

from __future__ import annotations

import io
import json
import posixpath
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from asd.io import storage
from tests import faulty_audio as fa
from tests.pages import parse
from tests.pngs import PNG_SIGNATURE, assert_drawn_png
from tests.triage_fixtures import NIGHT, copy_root, make_night, rescore_cfg


def _decoded(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return x, sr


def _is_relative(href: str) -> bool:
    return "://" not in href and not href.startswith(("/", "//", "data:", "javascript:"))


def _expected_rank(scores: list[dict]) -> list[str]:
    hits = [r for r in scores if r["decision"] and not r["faults"]]
    return [r["clip_id"] for r in sorted(hits, key=lambda r: (-r["score"] / r["threshold"], -r["score"], r["clip_id"]))]


def test_the_nights_page_ranks_anomalies_and_lists_sensor_faults_apart(triage_night):
    res, what = triage_night["result"], triage_night["what"]
    part = Path(res.partition)
    folder = part / "report"
    assert res.page == str(folder / "index.html") and storage.is_published(str(part))
    scores = pq.read_table(part / "scores.parquet").to_pylist()
    page = parse((folder / "index.html").read_text())
    # every clip above its threshold without a sensor fault, most above it first; the muffled ones among them
    ranked = _expected_rank(scores)
    assert [clip for _, clip in page.anomalies] == ranked
    assert [rank for rank, _ in page.anomalies] == list(range(1, len(ranked) + 1))
    assert {c for c, k in what.items() if k.startswith("muffled")} <= set(ranked)
    # the sensor-fault table lists exactly the silent and the clipped clip, which are not ranked
    faulty = {c for c, k in what.items() if k in ("silent", "clipped")}
    assert sorted(page.faults) == sorted(faulty) and not faulty & set(ranked)
    assert {r["clip_id"]: r["faults"] for r in scores if r["faults"]} == {
        c: [k] for c, k in what.items() if k in ("silent", "clipped")}
    # the summary counts both, apart
    summary = json.loads((part / "summary.json").read_text())
    assert summary["sensor_faults"] == {"clips": 2, "clipped": 1, "silent": 1}
    assert summary["anomalies"] == len(ranked) and res.n_sensor_faults == 2
    assert summary["anomalies_above_threshold"] == sum(r["decision"] for r in scores) == res.n_anomalies
    assert summary["page"] == "report/index.html"
    # A/B: each shown anomaly plays its own recording and that of the training clip its score came from
    by_clip = {r["clip_id"]: r for r in scores}
    assert len(page.audio) == 2 * len(ranked) and not page.missing
    for side, src in page.audio:
        x, sr = _decoded((folder / src).read_bytes())
        assert sr == 16000 and x.shape[1] == 1 and x.shape[0] > 16000
    served = triage_night["root"]
    for rank, clip in page.anomalies:
        mine, _ = _decoded((folder / f"audio/{rank:02d}-clip.wav").read_bytes())
        theirs, _ = _decoded((folder / f"audio/{rank:02d}-normal.wav").read_bytes())
        inbox_x, _ = _decoded((triage_night["inbox"] / clip).read_bytes())
        assert np.abs(mine[:, 0] - inbox_x[:, 0]).max() < 1e-3
        neighbour = by_clip[clip]["neighbour_clip_id"]
        assert neighbour and neighbour.split("/")[1] == "train" and neighbour.split("/")[0] == by_clip[clip]["machine_type"]
        from asd.stores.features import read_features_table

        path = read_features_table(str(served), columns=["clip_id", "path"]).to_pylist()
        train_x, _ = _decoded(Path(next(r["path"] for r in path if r["clip_id"] == neighbour)).read_bytes())
        assert np.abs(theirs[:, 0] - train_x[:, 0]).max() < 1e-3
    # every picture decodes; every link is relative and resolves; no script
    assert len([i for i in page.images if i.startswith("img/spec-")]) == len(ranked) and "img/trend.png" in page.images
    for src in page.images:
        data = (folder / src).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert_drawn_png(data, min_side=100)
    for href in page.links + page.images + [s for _, s in page.audio]:
        assert _is_relative(href) and (folder / href).resolve().exists(), href
    assert {"../scores.parquet", "../summary.json"} <= set(page.links) and page.scripts == 0
    # the trend reads both nights from the nightly table
    text = (folder / "index.html").read_text()
    assert "2026-11-23" in text and NIGHT in text
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 2_000_000, size


def test_a_night_whose_neighbour_recordings_are_gone_says_so(triage_served, tmp_path):
    """The training clips were deleted since training: the page plays the night's clips and says the
    normal ones are gone; the night is published whole."""
    from asd.stages.rescore import rescore

    corpus, served = triage_served
    root = copy_root(served, tmp_path / "root")
    what = make_night(corpus, tmp_path / "inbox", normals=2, muffle=(8, 16), faults={}, start=700)
    moved = []
    try:
        for train in sorted(Path(corpus).glob("*/train")):
            moved.append((train, train.with_name("train.gone")))
            train.rename(moved[-1][1])
        res = rescore(str(tmp_path / "inbox"), str(root), date="2026-11-27", cfg=rescore_cfg())
    finally:
        for train, gone in moved:
            gone.rename(train)
    page = parse((Path(res.partition) / "report" / "index.html").read_text())
    shown = [c for _, c in page.anomalies]
    assert {c for c, k in what.items() if k.startswith("muffled")} <= set(shown)
    assert [s for s, _ in page.audio] == ["clip"] * len(shown)
    assert [s for s, _ in page.missing] == ["normal"] * len(shown)
    assert all("is gone from" in text and "/train/" in text for _, text in page.missing)
    assert storage.is_published(res.partition) and pq.read_table(Path(res.partition) / "scores.parquet").num_rows == 4


def test_an_empty_inbox_publishes_a_night_that_says_so(triage_served, tmp_path):
    from asd.stages.rescore import rescore

    root = copy_root(triage_served[1], tmp_path / "root")
    (tmp_path / "inbox").mkdir()
    res = rescore(str(tmp_path / "inbox"), str(root), date="2026-11-28", cfg=rescore_cfg())
    assert res.changed and res.n_inbox == 0 and storage.is_published(res.partition)
    assert pq.read_table(Path(res.partition) / "scores.parquet").num_rows == 0
    summary = json.loads((Path(res.partition) / "summary.json").read_text())
    assert summary["clips"] == 0 and summary["sensor_faults"] == {"clips": 0}
    page = parse(Path(res.page).read_text())
    assert any("held no recordings" in n for n in page.notes) and not page.anomalies and not page.faults
    again = rescore(str(tmp_path / "inbox"), str(root), date="2026-11-28", cfg=rescore_cfg())
    assert not again.changed and again.page == res.page


def test_a_night_of_sensor_faults_only(triage_served, tmp_path):
    from asd.stages.rescore import rescore

    corpus, served = triage_served
    root = copy_root(served, tmp_path / "root")
    faults = {"silent": fa.silent(near=True), "clipped": fa.clipped(seed=5), "dropout": fa.dropout(seed=6),
              "dc_offset": fa.dc_offset(seed=7), "short": fa.short(seed=8)}
    what = make_night(corpus, tmp_path / "inbox", normals=0, muffle=(), faults=faults, start=800)
    res = rescore(str(tmp_path / "inbox"), str(root), date="2026-11-29", cfg=rescore_cfg())
    scores = {r["clip_id"]: r["faults"] for r in pq.read_table(Path(res.partition) / "scores.parquet").to_pylist()}
    assert scores == {c: [k] for c, k in what.items()}  # "short": against the served root's usual length (2 s)
    page = parse(Path(res.page).read_text())
    assert sorted(page.faults) == sorted(what) and not page.anomalies
    assert any(n.startswith("Every clip (5) has a sensor fault") for n in page.notes)
    summary = json.loads((Path(res.partition) / "summary.json").read_text())
    assert summary["anomalies"] == 0 and summary["sensor_faults"]["clips"] == 5


def test_a_crash_while_writing_the_page_publishes_nothing_and_a_rerun_does_it_all(triage_served, tmp_path,
                                                                                 monkeypatch):
    from asd.reports import triage_media
    from asd.stages.rescore import rescore

    corpus, served = triage_served
    root = copy_root(served, tmp_path / "root")
    make_night(corpus, tmp_path / "inbox", normals=3, muffle=(8,), faults={"silent": fa.silent()}, start=900)

    def boom(*a, **k):
        raise RuntimeError("killed while drawing the trend")

    monkeypatch.setattr(triage_media, "trend_png", boom)
    with pytest.raises(RuntimeError, match="killed while drawing"):
        rescore(str(tmp_path / "inbox"), str(root), date="2026-11-30", cfg=rescore_cfg())
    part = root / "rescore" / "date=2026-11-30"
    assert not part.exists()  # no scores, no CSVs, no half a page
    monkeypatch.undo()
    res = rescore(str(tmp_path / "inbox"), str(root), date="2026-11-30", cfg=rescore_cfg())
    assert res.changed and res.n_new == 5 and (part / "report" / "img" / "trend.png").exists()
    assert pq.read_table(part / "scores.parquet").num_rows == 5


@pytest.mark.s3
def test_a_night_on_s3_publishes_its_page_with_the_night(triage_served, tmp_path, s3_bucket):
    from asd.io.serving import set_current_model
    from asd.stages.rescore import rescore

    corpus, served = triage_served
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(served) + "/", f"{s3_bucket}/root/", recursive=True)
    set_current_model(f"{s3_bucket}/root", "logmel", "logmel_stats", {})
    make_night(corpus, tmp_path / "inbox", normals=3, muffle=(8, 16), faults={"clipped": fa.clipped()}, start=950)
    fs.put(str(tmp_path / "inbox") + "/", f"{s3_bucket}/inbox/2026-12-01/", recursive=True)
    res = rescore(f"{s3_bucket}/inbox/2026-12-01", f"{s3_bucket}/root", date="2026-12-01", cfg=rescore_cfg())
    assert res.page == f"{s3_bucket}/root/rescore/date=2026-12-01/report/index.html"
    page = parse(storage.read_text(res.page))
    folder = posixpath.dirname(res.page)
    assert len(page.anomalies) >= 2 and len(page.faults) == 1 and len(page.audio) == 2 * len(page.anomalies)
    for href in page.links + page.images + [s for _, s in page.audio]:
        key = posixpath.normpath(posixpath.join(folder.split("://", 1)[1], href))
        assert _is_relative(href) and storage.exists("s3://" + key), href
    x, sr = _decoded(storage.read_bytes(posixpath.join(folder, page.audio[0][1])))
    assert sr == 16000 and x.size > 0


def test_a_scoring_run_writes_its_page_and_counts_sensor_faults_in_its_report(triage_served, tmp_path):
    from asd.stages.score import ScoreConfig, score

    _, served = triage_served
    root = tmp_path / "root"
    shutil.copytree(served, root)
    out = root / "scores" / "logmel"
    res = score(str(root / "embeddings" / "logmel"), str(out), ScoreConfig(progress=False), title="logmel")
    assert res.sensor_faults == {"clips": 2, "clipped": 1, "silent": 1} and res.page == str(out / "report" / "index.html")
    report = (out / "report.md").read_text()
    assert "**sensor faults: 2** (clipped 1, silent 1)" in report
    scores = pq.read_table(out / "scores.parquet")
    assert scores.column("neighbour_clip_id").null_count == 0
    page = parse(Path(res.page).read_text())
    assert sorted(page.faults) == sorted(c for c in scores.column("clip_id").to_pylist()
                                         if "_0090_" in c or "_0091_" in c)
    rows = pq.read_table(out / "scores.parquet").to_pylist()
    faults = {c: ["x"] for c in page.faults}
    assert [c for _, c in page.anomalies] == _expected_rank([{**r, "faults": faults.get(r["clip_id"])} for r in rows])
    assert {"../roc.png", "../histograms.png"} <= set(page.images)
    for href in page.images + page.links + [s for _, s in page.audio]:
        assert _is_relative(href) and (out / "report" / href).resolve().exists(), href
