"""A static triage page: which machines sound wrong, how sure, what it sounds like beside a normal
clip, whether it is getting worse, and which clips are a sensor's fault rather than the machine's.

:func:`write_page` writes one folder: ``index.html`` (no JavaScript, no external resource), the
PNGs it shows (``img/``) and the few WAVs it plays (``audio/``), every link relative, so the folder
works from a local disk and from S3 static hosting alike. Its parts:

* what happened (notes: an empty inbox, a night of sensor faults, clips rejected at featurize);
* per machine type and section: clips, anomalies, sensor faults and the decision threshold;
* anomalies ranked by how far their score is above their threshold (score / threshold: scores of
  different machine types and sections are on different scales, their thresholds put them on one),
  clips with a sensor fault left out; the first ``top`` with a log-mel spectrogram beside that of
  the normal training clip the score came from, and an audio player for each (A/B), the rest listed;
* the sensor faults (:mod:`asd.data.sensor`), apart from anomalies, with what was measured;
* the anomaly rate per machine type over the last nights (nightly rescoring);
* figures a scoring run already has (ROC, histograms), and links to the result files.

The page's data come from the stage that writes it (:mod:`asd.stages.triage`); this module only
ranks, draws and writes.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from dataclasses import dataclass, field

import numpy as np

from asd.data.audio import AudioError
from asd.io import storage

HTML_NAME = "index.html"


@dataclass
class PageConfig:
    """What a triage page shows and how much it copies (``score.page`` in the job configs)."""

    enabled: bool = True
    top: int = 10  # anomalies shown with spectrograms and players (each copies 2 clips: it and its normal clip)
    listed: int = 200  # further anomalies listed as text (all of them are in the CSVs)
    faults_listed: int = 500  # sensor-fault clips listed (all of them are in scores.parquet)
    audio_max_s: float = 5.0  # copied clips are cut to their first 5 s (the page says so): 10 A/B pairs of
    # 10-s DCASE clips are 3.2 MB of WAV at 16 kHz, 6.4 MB uncut
    trend_nights: int = 14  # nights of the anomaly-rate chart (nightly rescoring)


@dataclass
class ClipRow:
    """One scored clip as the page shows it (media only for the clips that get them)."""

    clip_id: str
    machine_type: str
    section: str
    score: float
    threshold: float
    decision: int
    faults: list[str] | None = None
    label: str | None = None  # the truth, where the clip's name tells it (a scoring run's test clips)
    audio_uri: str | None = None  # where the clip's recording is stored
    fbank: np.ndarray | None = None  # its log-mel matrix (frames, mel bins)
    neighbour_clip_id: str | None = None  # the normal training clip the score came from
    neighbour_audio_uri: str | None = None
    neighbour_fbank: np.ndarray | None = None
    neighbour_note: str = ""  # why there is no neighbour to show
    sensor: dict = field(default_factory=dict)  # what the sensor checks measured (rms_dbfs, ...), duration_s

    @property
    def ratio(self) -> float:
        """The score over the threshold (inf for a positive score over a zero threshold)."""
        if not math.isfinite(self.threshold):
            return 0.0
        if self.threshold <= 0:
            return math.inf if self.score > self.threshold else 0.0
        return self.score / self.threshold


@dataclass
class TriagePage:
    title: str
    subtitle: str
    notes: list[str] = field(default_factory=list)  # what happened, first thing on the page
    counts: dict = field(default_factory=dict)  # clips, anomalies, sensor_faults, rejected
    groups: list[dict] = field(default_factory=list)  # machine_type, section, clips, anomalies, sensor_faults, threshold
    anomalies: list[ClipRow] = field(default_factory=list)  # ranked (rank_anomalies)
    faults: list[ClipRow] = field(default_factory=list)
    trend: dict | None = None  # {"nights": [...], "types": {type: [[clips, anomalies, faults] | None, ...]}}
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, relative href)
    links: list[tuple[str, str]] = field(default_factory=list)  # (text, relative href)
    footer: list[str] = field(default_factory=list)


def has_fault(row) -> bool:
    faults = row.faults if isinstance(row, ClipRow) else row.get("faults")
    return bool(faults)


def rank_anomalies(rows: list[ClipRow]) -> list[ClipRow]:
    """The clips decided anomalous without a sensor fault, most above their threshold first (then
    by score, then by clip id)."""
    hits = [r for r in rows if r.decision and not has_fault(r)]
    return sorted(hits, key=lambda r: (-r.ratio, -r.score, r.clip_id))


# --------------------------------------------------------------------------- writing


def write_page(folder: str, page: TriagePage, cfg: PageConfig | None = None, sample_rate: int = 16000) -> dict:
    """Write the page into ``folder`` (a staging folder: the caller publishes it with its results).
    Returns ``{"index", "files", "bytes", "audio"}``."""
    from asd.reports import triage_media as media

    cfg = cfg or PageConfig()
    written: dict[str, int] = {}

    def put(rel: str, data: bytes) -> str:
        storage.atomic_write_bytes(storage.join(folder, rel), data)
        written[rel] = len(data)
        return rel

    shown = []
    for rank, row in enumerate(page.anomalies[: cfg.top], start=1):
        item = {"row": row, "rank": rank}
        if row.fbank is not None:
            item["img"] = put(f"img/spec-{rank:02d}.png", media.spectrogram_png(row.fbank, row.neighbour_fbank))
        for side, uri, name in (("clip", row.audio_uri, row.clip_id), ("normal", row.neighbour_audio_uri,
                                                                        row.neighbour_clip_id)):
            if side == "normal" and name is None:
                item[side] = ("note", _neighbour_text(row))
                continue
            try:
                data, cut = media.playable_wav(uri, cfg.audio_max_s, sample_rate) if uri else (None, False)
            except FileNotFoundError:
                item[side] = ("note", f"the recording of {name} is gone from {uri}")
                continue
            except (OSError, AudioError) as exc:  # the page says what went wrong; the night's results stand
                item[side] = ("note", f"the recording of {name} could not be read: {type(exc).__name__}: {exc}")
                continue
            if data is None:
                item[side] = ("note", f"no stored recording for {name}")
                continue
            item[side] = ("audio", put(f"audio/{rank:02d}-{side}.wav", data), cut, cfg.audio_max_s)
        shown.append(item)
    trend_img = None
    if page.trend and page.trend.get("nights"):
        rates = {mt: [None if c is None or not c[0] else c[1] / c[0] for c in cells]
                 for mt, cells in page.trend["types"].items()}
        trend_img = put("img/trend.png", media.trend_png(page.trend["nights"], rates))
    text = render_html(page, shown, trend_img, cfg)
    put(HTML_NAME, text.encode("utf-8"))
    return {"index": storage.join(folder, HTML_NAME), "files": len(written), "bytes": sum(written.values()),
            "audio": sum(1 for rel in written if rel.startswith("audio/"))}


def _neighbour_text(row: ClipRow) -> str:
    if row.neighbour_clip_id is None:
        return row.neighbour_note or "no nearest normal clip is known for this score"
    return f"nearest normal clip: {row.neighbour_clip_id}"


# --------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;
padding:0 16px}
h1{font-size:22px;margin:0}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:2px 0 14px}.notes{background:#fff6d6;border:1px solid #e8d38a;padding:8px 12px;margin:10px 0}
.notes p{margin:4px 0}.counts{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.count{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.count b{display:block;font-size:22px}.count.bad b{color:#b3261e}.count.warn b{color:#9a6700}
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{border-bottom:1px solid #e4e4e4;padding:4px 6px;
text-align:left;vertical-align:top}th{background:#f6f6f6;font-weight:600}td.num,th.num{text-align:right;
font-variant-numeric:tabular-nums}.clip{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
overflow-wrap:anywhere}.ab .clip{display:block;color:#444;margin:2px 0}.dec1{color:#b3261e;font-weight:600}.fault{color:#9a6700;font-weight:600}
.media img{display:block;max-width:100%;height:auto;margin:2px 0}
.spec{max-width:730px}.spec .cap{display:flex;font-size:12px;color:#444}.spec .cap span{flex:1}.ab{display:flex;gap:16px;flex-wrap:wrap}
.ab div{flex:1;min-width:260px}.ab audio{width:100%}.note{color:#666;font-style:italic}
footer{color:#666;font-size:12px;margin-top:30px;border-top:1px solid #ddd;padding-top:8px}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, fmt: str = "{:.4g}") -> str:
    if value is None:
        return "n/a"
    v = float(value)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return fmt.format(v)


def _decision(d: int) -> str:
    return '<span class="dec1">anomaly</span>' if d else "normal"


def _faults(faults) -> str:
    return ", ".join(faults) if faults else ""


def _counts(page: TriagePage) -> str:
    c = page.counts
    boxes = [("clips", c.get("clips", 0), ""), ("anomalies", c.get("anomalies", 0), "bad" if c.get("anomalies") else ""),
             ("sensor faults", c.get("sensor_faults", 0), "warn" if c.get("sensor_faults") else "")]
    if c.get("rejected"):
        boxes.append(("rejected inputs", c["rejected"], "warn"))
    return '<div class="counts">' + "".join(
        f'<div class="count {cls}" id="count-{_e(k.replace(" ", "-"))}"><b>{_e(v)}</b>{_e(k)}</div>'
        for k, v, cls in boxes) + "</div>"


def _groups(page: TriagePage) -> str:
    if not page.groups:
        return '<p class="note">No clip was scored.</p>'
    rows = "".join(
        f'<tr><td>{_e(g["machine_type"])}</td><td>{_e(g["section"])}</td><td class="num">{g["clips"]}</td>'
        f'<td class="num">{g["anomalies"]}</td><td class="num">{g["sensor_faults"]}</td>'
        f'<td class="num">{_num(g["threshold"])}</td></tr>' for g in page.groups)
    return ('<table id="groups"><tr><th>machine type</th><th>section</th><th class="num">clips</th>'
            '<th class="num">anomalies</th><th class="num">sensor faults</th><th class="num">threshold</th></tr>'
            f"{rows}</table>")


def _player(item: dict, side: str, label: str) -> str:
    got = item.get(side)
    if got is None:
        return ""
    if got[0] == "note":
        return f'<div><b>{_e(label)}</b><p class="note" data-missing="{side}">{_e(got[1])}</p></div>'
    r = item["row"]
    clip = r.clip_id if side == "clip" else r.neighbour_clip_id
    cut = f' <span class="note">(its first {got[3]:g} s)</span>' if got[2] else ""
    return (f'<div><b>{_e(label)}</b>{cut}<span class="clip">{_e(clip)}</span>'
            f'<audio controls preload="metadata" data-side="{side}" data-clip="{_e(clip)}" '
            f'src="{_e(got[1])}"><a href="{_e(got[1])}">{_e(got[1])}</a></audio></div>')


def _spectrogram(item: dict) -> str:
    r = item["row"]
    if not item.get("img"):
        return '<p class="note">No log-mel features were found for this clip.</p>'
    seconds = r.fbank.shape[0] * 0.01  # 10 ms frames
    right = "nearest normal clip" if r.neighbour_fbank is not None else f"nearest normal clip: {_neighbour_text(r)}"
    return (f'<div class="spec"><div class="cap"><span>this clip</span><span>{_e(right)}</span></div>'
            f'<img src="{_e(item["img"])}" alt="log-mel spectrogram of {_e(r.clip_id)} beside its nearest normal clip" '
            f'width="730" height="{r.fbank.shape[1]}"><div class="cap note"><span>log-mel, {r.fbank.shape[1]} bins '
            f"(low frequencies at the bottom), {seconds:g} s left to right, one colour scale</span></div></div>")


def _anomalies(page: TriagePage, shown: list[dict], cfg: PageConfig) -> str:
    if not page.anomalies:
        return '<p class="note" id="no-anomalies">No clip is above its threshold (sensor faults aside).</p>'
    truth = any(r.label for r in page.anomalies)
    head = ('<tr><th class="num">rank</th><th>clip</th><th>machine type / section</th><th class="num">score</th>'
            '<th class="num">threshold</th><th class="num">score / threshold</th><th>decision</th>'
            + ("<th>truth</th>" if truth else "") + "</tr>")
    out = [f'<table id="anomalies">{head}']
    for item in shown:
        r = item["row"]
        out.append(
            f'<tr class="anomaly" data-rank="{item["rank"]}" data-clip="{_e(r.clip_id)}"><td class="num">{item["rank"]}</td>'
            f'<td class="clip">{_e(r.clip_id)}</td><td>{_e(r.machine_type)} / {_e(r.section)}</td>'
            f'<td class="num">{_num(r.score)}</td><td class="num">{_num(r.threshold)}</td>'
            f'<td class="num">{_num(r.ratio, "{:.2f}")}×</td><td>{_decision(r.decision)}</td>'
            + (f"<td>{_e(r.label or '')}</td>" if truth else "") + "</tr>")
        media = _spectrogram(item)
        out.append(f'<tr class="media"><td></td><td colspan="{6 + truth}" class="media">{media}<div class="ab">'
                   f'{_player(item, "clip", "this clip")}{_player(item, "normal", "nearest normal clip")}</div></td></tr>')
    more = page.anomalies[len(shown): len(shown) + cfg.listed]
    for rank, r in enumerate(more, start=len(shown) + 1):
        out.append(
            f'<tr class="anomaly" data-rank="{rank}" data-clip="{_e(r.clip_id)}"><td class="num">{rank}</td>'
            f'<td class="clip">{_e(r.clip_id)}</td><td>{_e(r.machine_type)} / {_e(r.section)}</td>'
            f'<td class="num">{_num(r.score)}</td><td class="num">{_num(r.threshold)}</td>'
            f'<td class="num">{_num(r.ratio, "{:.2f}")}×</td><td>{_decision(r.decision)}</td>'
            + (f"<td>{_e(r.label or '')}</td>" if truth else "") + "</tr>")
    out.append("</table>")
    left = len(page.anomalies) - len(shown) - len(more)
    if left > 0:
        out.append(f'<p class="note">{left} more anomalies are in the decision_result CSVs and scores.parquet.</p>')
    return "".join(out)


def _fault_rows(page: TriagePage, cfg: PageConfig) -> str:
    if not page.faults:
        return '<p class="note" id="no-faults">No clip has a sensor fault.</p>'
    head = ('<tr><th>clip</th><th>machine type / section</th><th>faults</th><th class="num">RMS (dBFS)</th>'
            '<th class="num">at full scale</th><th class="num">longest zero run</th><th class="num">DC offset</th>'
            '<th class="num">length (s)</th><th class="num">score</th><th>decision</th></tr>')
    out = [f'<table id="faults">{head}']
    for r in page.faults[: cfg.faults_listed]:
        s = r.sensor
        share = s.get("clipped_share")
        run = s.get("zero_run_s")
        out.append(
            f'<tr class="sensor-fault" data-clip="{_e(r.clip_id)}"><td class="clip">{_e(r.clip_id)}</td>'
            f'<td>{_e(r.machine_type)} / {_e(r.section)}</td><td class="fault">{_e(_faults(r.faults))}</td>'
            f'<td class="num">{_num(s.get("rms_dbfs"), "{:.1f}")}</td>'
            f'<td class="num">{"n/a" if share is None else _num(100 * share, "{:.2f}") + " %"}</td>'
            f'<td class="num">{"n/a" if run is None else _num(1000 * run, "{:.0f}") + " ms"}</td>'
            f'<td class="num">{_num(s.get("dc_offset"), "{:+.3f}")}</td>'
            f'<td class="num">{_num(s.get("duration_s"), "{:.2f}")}</td>'
            f'<td class="num">{_num(r.score)}</td><td>{_decision(r.decision)}</td></tr>')
    out.append("</table>")
    if len(page.faults) > cfg.faults_listed:
        out.append(f'<p class="note">{len(page.faults) - cfg.faults_listed} more sensor-fault clips are in '
                   "scores.parquet (column faults).</p>")
    return "".join(out)


def _trend(page: TriagePage, img: str | None) -> str:
    t = page.trend
    if not t or not t.get("nights"):
        return ""
    types = sorted(t["types"])
    head = "<tr><th>night</th>" + "".join(f"<th>{_e(mt)}</th>" for mt in types) + "</tr>"
    rows = []
    for i, night in enumerate(t["nights"]):
        cells = []
        for mt in types:
            c = t["types"][mt][i]
            cells.append('<td class="num">–</td>' if c is None else
                         f'<td class="num">{c[1]} / {c[0]}' + (f' <span class="fault">+{c[2]} sensor</span>' if c[2]
                                                               else "") + "</td>")
        rows.append(f"<tr><td>{_e(night)}</td>{''.join(cells)}</tr>")
    pic = f'<img src="{_e(img)}" alt="anomaly rate per machine type over the last nights" width="720" height="260">' \
        if img else ""
    return (f'<h2 id="trend">Anomaly rate over the last {len(t["nights"])} nights</h2>{pic}'
            '<p class="note">Anomalies without a sensor fault over clips scored, per machine type and night '
            '(read from the nightly scores).</p>'
            f'<table id="trend-table">{head}{"".join(rows)}</table>')


def render_html(page: TriagePage, shown: list[dict], trend_img: str | None, cfg: PageConfig) -> str:
    notes = "".join(f"<p>{_e(n)}</p>" for n in page.notes)
    figures = "".join(f'<figure><img src="{_e(href)}" alt="{_e(cap)}"><figcaption>{_e(cap)}</figcaption></figure>'
                      for cap, href in page.figures)
    links = "".join(f'<li><a href="{_e(href)}">{_e(text)}</a></li>' for text, href in page.links)
    n_top = len(shown)
    rank_note = (f"Ranked by score over the threshold of the clip's machine type and section; the first {n_top} "
                 "with the log-mel spectrogram and audio of the clip and of the normal training clip nearest to it "
                 "(the neighbour that gave the score). Clips with a sensor fault are listed apart, below."
                 if page.anomalies else "")
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    foot = "".join(f"<p>{_e(f)}</p>" for f in page.footer + [
        f"Audio: copies re-encoded to mono 16-bit WAV, cut after {cfg.audio_max_s:g} s where longer. "
        f"Written {generated}."])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(page.title)}</title><style>{CSS}</style></head>
<body>
<h1>{_e(page.title)}</h1><p class="sub">{_e(page.subtitle)}</p>
{f'<div class="notes" id="notes">{notes}</div>' if notes else ''}
{_counts(page)}
<h2 id="per-type">Per machine type and section</h2>{_groups(page)}
<h2 id="top">Anomalies</h2><p class="note">{_e(rank_note)}</p>{_anomalies(page, shown, cfg)}
<h2 id="sensor">Sensor faults</h2>
<p class="note">Clips whose recording looks wrong (silent, clipped, dropouts, DC offset, much too short): the
microphone or the recorder more likely than the machine. They are scored like every clip but not ranked as
anomalies.</p>{_fault_rows(page, cfg)}
{_trend(page, trend_img)}
{f'<h2 id="figures">Figures</h2>{figures}' if figures else ''}
<h2 id="files">Files</h2><ul id="links">{links}</ul>
<footer>{foot}</footer>
</body></html>
"""
