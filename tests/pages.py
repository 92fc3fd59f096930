"""What a triage page's HTML holds, read with the standard library's parser (no browser)."""

from __future__ import annotations

from html.parser import HTMLParser


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.anomalies: list[tuple[int, str]] = []  # (rank, clip) in document order
        self.faults: list[str] = []
        self.images: list[str] = []
        self.audio: list[tuple[str, str]] = []  # (side, src)
        self.missing: list[tuple[str, str]] = []  # (side, text) where a recording could not be shown
        self.links: list[str] = []
        self.scripts = 0
        self.notes: list[str] = []
        self._in: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "anomaly" in (a.get("class") or "").split():
            self.anomalies.append((int(a["data-rank"]), a["data-clip"]))
        elif tag == "tr" and "sensor-fault" in (a.get("class") or "").split():
            self.faults.append(a["data-clip"])
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "audio":
            self.audio.append((a.get("data-side"), a["src"]))
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "script":
            self.scripts += 1
        elif tag == "div" and a.get("id") == "notes":
            self._in = "notes"
        elif tag == "p" and a.get("data-missing"):
            self._in = "missing:" + a["data-missing"]
            self._text = []
        if self._in == "notes" and tag == "p":
            self._text = []

    def handle_data(self, data):
        if self._in:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "p" and self._in == "notes":
            self.notes.append("".join(self._text))
        elif tag == "p" and self._in and self._in.startswith("missing:"):
            self.missing.append((self._in.split(":", 1)[1], "".join(self._text)))
            self._in = None
        elif tag == "div" and self._in == "notes":
            self._in = None


def parse(text: str) -> PageParser:
    p = PageParser()
    p.feed(text)
    return p
