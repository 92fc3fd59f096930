"""Training checkpoints: reading a run's state with a fallback past corrupt checkpoints, naming
checkpoint folders, and exporting a trained encoder to ``<root>/models/<tag>``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from dataclasses import asdict
from typing import Iterable

import torch

from asd.io import layout, storage
from asd.models.registry import save_checkpoint
from asd.training.loop import Objective

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class CheckpointUnreadable(RuntimeError):
    """A checkpoint folder without a readable training state (and, after the fallback, no
    readable older one either)."""


def checkpoint_key(name: str) -> tuple[int, int] | None:
    """Order of checkpoint folder names ``step-XXXXXXXX`` (``-N``: re-written after a fallback)."""

    m = re.fullmatch(r"step-(\d+)(?:-(\d+))?", name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _split_uri(uri: str) -> tuple[str, str]:
    uri = str(uri).rstrip("/")
    if storage.is_remote(uri):
        parent, _, name = uri.rpartition("/")
        return parent, name
    return os.path.dirname(uri), os.path.basename(uri)


def _read_state(checkpoint_uri: str) -> dict:
    """``state.pt`` of one checkpoint folder; :class:`CheckpointUnreadable` when it is missing,
    truncated, not a torch file or not a training state (other storage errors propagate)."""
    uri = storage.join(checkpoint_uri, STATE_FILE)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise CheckpointUnreadable(f"{uri} is missing") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, pickle errors ...
        raise CheckpointUnreadable(f"{uri} is unreadable ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(state, dict) or "module" not in state or "step" not in state:
        raise CheckpointUnreadable(f"{uri} is not a training state")
    return state


def _older_checkpoints(checkpoint_uri: str) -> list[str]:
    """The other checkpoint folders of the same run folder older than ``checkpoint_uri``, newest first."""
    parent, name = _split_uri(checkpoint_uri)
    key = checkpoint_key(name)
    fs, path = storage.filesystem(parent)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        other = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        k = checkpoint_key(other)
        if e.get("type") == "directory" and k is not None and (key is None or k < key):
            found.append((k, storage.join(parent, other)))
    return [uri for _, uri in sorted(found, reverse=True)]


def load_state_with_fallback(checkpoint_uri: str) -> tuple[dict, str, list[str]]:
    """The training state of ``checkpoint_uri``; when that one is unreadable, the newest older
    readable checkpoint of the same run folder (the ones ``CheckpointConfig(num_to_keep)``
    kept), with a warning naming each unreadable one. Returns ``(state, URI of the checkpoint
    it came from, URIs of the unreadable checkpoints skipped)``; raises
    :class:`CheckpointUnreadable` when no checkpoint of the run is readable."""
    skipped: list[str] = []
    errors: list[str] = []
    for uri in [checkpoint_uri, *_older_checkpoints(checkpoint_uri)]:
        try:
            state = _read_state(uri)
        except CheckpointUnreadable as exc:
            log.warning("checkpoint %s is corrupt: %s; falling back to the previous kept checkpoint", uri, exc)
            skipped.append(uri)
            errors.append(str(exc))
            continue
        if skipped:
            log.warning("restoring step %d from %s instead of the corrupt checkpoint(s) %s",
                        int(state["step"]), uri, ", ".join(skipped))
        return state, uri, skipped
    raise CheckpointUnreadable(
        "no readable checkpoint at or before {1} in {0} (tried {2}): ".format(*_split_uri(checkpoint_uri), len(skipped))
        + "; ".join(errors) + ". Remove the run folder (or rerun with resume=false) to start over."
    )


def checkpoint_dir_name(step: int, unreadable: Iterable[str] = ()) -> str:
    """``step-XXXXXXXX``, with a ``-N`` suffix when that folder holds a corrupt checkpoint
    that Ray Train still tracks: re-used, the folder would be deleted together with the old
    entry once ``num_to_keep`` rotates it out, taking the new checkpoint with it."""
    taken = {_split_uri(u)[1] for u in unreadable}
    name = base = f"step-{step:08d}"
    n = 0
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def load_training_state(checkpoint_uri: str, fallback: bool = True) -> dict:
    """The training state saved in a checkpoint folder (local or ``s3://``); when it is
    corrupt, the previous readable checkpoint of the run, with a warning (``fallback=False``:
    raise :class:`CheckpointUnreadable` instead). See :func:`load_state_with_fallback`."""
    return load_state_with_fallback(checkpoint_uri)[0] if fallback else _read_state(checkpoint_uri)


def export_encoder(objective: Objective, checkpoint_uri: str, root: str, tag: str, meta: dict | None = None) -> str:
    """Write the objective's encoder from a checkpoint to ``<root>/models/<tag>/encoder.pt``
    (+ ``config.json``); returns the encoder URI."""
    return export_encoders(objective, checkpoint_uri, root, [tag], [meta or {}])[0]


def export_encoders(objective: Objective, checkpoint_uri: str, root: str, tags: list[str],
                    metas: list[dict]) -> list[str]:
    """:func:`export_encoder` for the models an objective trains side by side: the checkpoint read
    and the module built once, member i (``objective.encoder(module, member=i)``) written to
    ``<root>/models/<tags[i]>`` with ``metas[i]``. One tag: the objective's one encoder."""
    state, checkpoint_uri, _ = load_state_with_fallback(checkpoint_uri)  # the one actually used
    module = objective.build()
    objective.setup(module, torch.device("cpu"))
    module.load_state_dict(state["module"])
    objective.load_state_dict(state.get("objective") or {})
    common = {
        **objective.describe(),
        "step": int(state["step"]),
        "checkpoint": checkpoint_uri,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    uris = []
    for i, (tag, meta) in enumerate(zip(tags, metas, strict=True)):
        encoder = objective.encoder(module) if len(tags) == 1 else objective.encoder(module, member=i)
        info = {**common, **meta}
        out = layout.models_dir(root, tag)
        uris.append(save_checkpoint(encoder, storage.join(out, "encoder.pt"), meta=info))
        storage.atomic_write_json(storage.join(out, "config.json"), {"encoder": asdict(encoder.cfg), "meta": info})
    return uris
