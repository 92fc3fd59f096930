"""A night's triage page opened in headless Chromium, as a person would: from the local disk and
over HTTP (as S3 static hosting serves it). The anomaly rows are there in rank order, every image
decodes, every audio element's source loads and plays as WAV, the sensor-fault table lists exactly
the silent and the clipped clip; a screenshot is written (``ASD_TRIAGE_SCREENSHOT=<png>`` keeps a
copy, as docs/img/triage.png was made).

Needs Chromium (Debian's ``chromium``; ``.ci/run`` installs it when missing); skipped, saying so,
where none is installed."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.browser import Chromium, find_chromium
from tests.pngs import assert_drawn_png
from tests.triage_fixtures import NIGHT

LOOK = """
(async () => {
  const rows = [...document.querySelectorAll('#anomalies tr.anomaly')].map(
      tr => [Number(tr.dataset.rank), tr.dataset.clip, tr.getBoundingClientRect().height > 0]);
  const faults = [...document.querySelectorAll('#faults tr.sensor-fault')].map(tr => tr.dataset.clip);
  const images = await Promise.all([...document.images].map(img => img.decode().then(
      () => ({src: img.currentSrc, ok: img.naturalWidth > 0 && img.naturalHeight > 0, w: img.naturalWidth}),
      e => ({src: img.currentSrc, ok: false, why: String(e)}))));
  const audio = [];
  for (const el of document.querySelectorAll('audio')) {   // one at a time: a small machine, many clips
    audio.push(await new Promise(resolve => {
      const a = new Audio();
      a.muted = true;
      a.preload = 'auto';
      const done = (ok, why) => { clearTimeout(timer); resolve({src: el.src, side: el.dataset.side, clip: el.dataset.clip,
          ok, why, duration: a.duration, played: a.currentTime, wav: a.canPlayType('audio/wav')}); };
      const timer = setTimeout(() => done(false, 'timeout'), 20000);
      a.addEventListener('error', () => done(false, 'media error ' + (a.error && a.error.code)));
      a.addEventListener('canplaythrough', () => {
        a.play().then(() => setTimeout(() => done(a.currentTime > 0, 'played'), 300),
                      e => done(false, 'play() refused: ' + e));
      }, {once: true});
      a.src = el.src;
    }));
  }
  return {title: document.title, rows, faults, images, audio,
          counts: Object.fromEntries([...document.querySelectorAll('.count')].map(
              c => [c.id, Number(c.querySelector('b').textContent)]))};
})()
"""


@pytest.fixture(scope="module")
def chromium():
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed here (apt-get install chromium; .ci/run installs it where apt-get "
                    "can, ASD_CHROMIUM names another binary)")
    return binary


@pytest.fixture()
def http_root(triage_night):
    """The night's partition served over HTTP on 127.0.0.1, as a static website serves it."""
    folder = Path(triage_night["result"].partition)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/report/index.html"
    server.shutdown()


def test_a_person_opens_the_nights_page_in_a_browser(chromium, triage_night, http_root, tmp_path):
    res, what = triage_night["result"], triage_night["what"]
    scores = pq.read_table(Path(res.partition) / "scores.parquet").to_pylist()
    hits = [r for r in scores if r["decision"] and not r["faults"]]
    ranked = [r["clip_id"] for r in sorted(hits, key=lambda r: (-r["score"] / r["threshold"], -r["score"], r["clip_id"]))]
    faulty = sorted(c for c, k in what.items() if k in ("silent", "clipped"))
    shot = tmp_path / "triage.png"
    with Chromium(chromium) as browser:
        for url in (Path(res.page).as_uri(), http_root):
            browser.open(url)
            seen = browser.evaluate(LOOK)
            assert seen["title"] == f"Night of {NIGHT}: machine sound triage", url
            assert [r[0] for r in seen["rows"]] == list(range(1, len(ranked) + 1))
            assert [r[1] for r in seen["rows"]] == ranked and all(r[2] for r in seen["rows"]), url
            assert sorted(seen["faults"]) == faulty, url
            assert seen["counts"] == {"count-clips": len(scores), "count-anomalies": len(ranked),
                                      "count-sensor-faults": 2}
            assert len(seen["images"]) == len(ranked) + 1 and all(i["ok"] for i in seen["images"]), seen["images"]
            assert len(seen["audio"]) == 2 * len(ranked)
            for a in seen["audio"]:
                assert a["ok"] and a["src"].endswith(".wav") and a["wav"] in ("maybe", "probably"), a
                assert 1.9 < a["duration"] < 2.1, a  # the whole 2 s clip
            assert [a["clip"] for a in seen["audio"] if a["side"] == "clip"] == ranked
            neighbours = {r["clip_id"]: r["neighbour_clip_id"] for r in scores}
            assert [a["clip"] for a in seen["audio"] if a["side"] == "normal"] == [neighbours[c] for c in ranked]
        browser.open(Path(res.page).as_uri())
        w, h = browser.screenshot(str(shot), max_height=1500)
    data = shot.read_bytes()
    assert_drawn_png(data, min_side=800)
    assert w >= 1000 and h >= 800
    keep = os.environ.get("ASD_TRIAGE_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
