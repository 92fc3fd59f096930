"""Concurrency on any storage root: an ordered commit log, and leases built on it.

Both rest on one primitive, :func:`asd.io.storage.create_exclusive` (put-if-absent: a local hard
link, or an S3 ``PutObject`` with ``If-None-Match: *``), so any number of processes on any number
of machines agree without a database or a lock service:

* :class:`CommitLog`: entries ``<dir>/<seq>.json`` (``seq`` zero-padded). A writer reads the
  log, builds its entry from what it saw, and creates the next number; if another writer created
  it first, the writer reads the new entries and tries again with the next number. Every
  entry is written whole in one step, so readers see whole entries or none, in one order that
  every reader agrees on.
* :class:`Lease`: mutual exclusion for a short critical section (publishing a directory,
  scoring a night) as a commit log of ``hold`` and ``release`` entries. A holder that dies
  leaves a hold that expires after ``ttl_s``; the next taker then creates the next entry, which
  only one of several takers can do.

See ``docs/design.md`` ("Concurrent writers") for why this and not a table format.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

from asd.io import storage

log = logging.getLogger(__name__)

SEQ_DIGITS = 12


def _name(seq: int) -> str:
    return f"{seq:0{SEQ_DIGITS}d}.json"


class CommitLog:
    """An append-only, totally ordered log of JSON entries under ``uri``."""

    def __init__(self, uri: str):
        self.uri = uri

    def sequence_numbers(self) -> list[int]:
        fs, path = storage.filesystem(self.uri)
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def read(self, seq: int) -> dict:
        return storage.read_json(storage.join(self.uri, _name(seq)))

    def create(self, seq: int, entry: dict) -> bool:
        """Write ``entry`` as number ``seq`` unless that number exists (then False)."""
        data = (json.dumps(entry, indent=1, sort_keys=True, default=str) + "\n").encode()
        return storage.create_exclusive(storage.join(self.uri, _name(seq)), data)

    def entries(self, after: int = -1) -> list[tuple[int, dict]]:
        """``(seq, entry)`` of every entry after ``after``, in order."""
        out = []
        for seq in self.sequence_numbers():
            if seq > after:
                try:
                    out.append((seq, self.read(seq)))
                except FileNotFoundError:  # compacted away between the listing and the read
                    continue
        return out

    def append(self, make: Callable[[list[tuple[int, dict]]], dict | None],
               attempts: int = 1000) -> tuple[int, dict] | None:
        """Add one entry. ``make(entries)`` builds it from every entry so far (called again with
        the longer log whenever another writer got the number first) or returns None to add
        nothing. Returns ``(seq, entry)``, or None when ``make`` declined."""
        entries = self.entries()
        for _ in range(attempts):
            entry = make(entries)
            if entry is None:
                return None
            seq = entries[-1][0] + 1 if entries else 0
            if self.create(seq, entry):
                return seq, entry
            entries = entries + self.entries(after=entries[-1][0] if entries else -1)
        raise RuntimeError(f"{self.uri}: no free entry after {attempts} attempts")

    def compact(self, keep: int) -> None:
        """Remove all but the last ``keep`` entries (for logs whose old entries mean nothing, as a
        lease's; a data log keeps every entry)."""
        seqs = self.sequence_numbers()
        for seq in seqs[:-keep] if keep else seqs:
            storage.remove(storage.join(self.uri, _name(seq)))


class LeaseTimeout(TimeoutError):
    """Another holder kept the lease for longer than the wait allowed."""


class Lease:
    """Mutual exclusion over ``uri`` (a folder of its own), for sections shorter than ``ttl_s``.

    ``with Lease(uri): ...``; waits up to ``wait_s`` for another holder (polling every
    ``poll_s``), then raises :class:`LeaseTimeout` naming the holder. A hold older than
    ``ttl_s`` counts as abandoned (its holder died) and may be taken over.
    """

    def __init__(self, uri: str, ttl_s: float | None = None, wait_s: float | None = None, poll_s: float = 0.2):
        self.log = CommitLog(uri)
        self.ttl_s = float(ttl_s if ttl_s is not None else os.environ.get("ASD_LEASE_TTL_S", 3600))
        self.wait_s = float(wait_s if wait_s is not None else os.environ.get("ASD_LEASE_WAIT_S", 7200))
        self.poll_s = poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.seq: int | None = None

    def _free(self, entries: list[tuple[int, dict]]) -> bool:
        if not entries:
            return True
        last = entries[-1][1]
        return last.get("op") == "release" or float(last.get("expires", 0)) < time.time()

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        while True:
            entries = self.log.entries()
            if self._free(entries):
                if entries and entries[-1][1].get("op") == "hold":
                    log.warning("%s: taking over the expired hold of %s", self.log.uri, entries[-1][1].get("owner"))
                seq = entries[-1][0] + 1 if entries else 0
                hold = {"op": "hold", "owner": self.owner, "time": time.time(), "expires": time.time() + self.ttl_s}
                if self.log.create(seq, hold):
                    self.seq = seq
                    return self
                continue  # another taker created that entry first: look again at once
            if time.monotonic() > deadline:
                holder = entries[-1][1]
                raise LeaseTimeout(f"{self.log.uri}: held by {holder.get('owner')} since {holder.get('time')} "
                                   f"(waited {self.wait_s:.0f} s; set ASD_LEASE_WAIT_S to wait longer)")
            time.sleep(self.poll_s)

    def release(self) -> None:
        if self.seq is None:
            return
        seq, self.seq = self.seq, None
        if not self.log.create(seq + 1, {"op": "release", "owner": self.owner, "time": time.time()}):
            log.warning("%s: our hold (entry %d) expired and was taken over before we released it",
                        self.log.uri, seq)
            return
        self.log.compact(keep=2)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lease_uri(final_uri: str) -> str:
    """Where the lease of a published directory lives: ``<parent>/_leases/<name>/``."""
    final_uri = final_uri.rstrip("/")
    parent, name = final_uri.rsplit("/", 1) if "/" in final_uri else (".", final_uri)
    return storage.join(parent, "_leases", name)


def publish_dir(staging_uri: str, final_uri: str, info: dict | None = None) -> str:
    """:func:`asd.io.storage.publish_dir` under the lease of ``final_uri``: concurrent publishers of
    one directory take turns, so it ends as one whole publish (on S3, interleaved copies and
    deletions of two publishers could otherwise leave a mix of both under one ``_SUCCESS``)."""
    with Lease(lease_uri(final_uri)):
        return storage.publish_dir(staging_uri, final_uri, info)
