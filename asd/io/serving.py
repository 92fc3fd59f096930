"""The serving pointer ``<root>/models/CURRENT``: which recipe serves, and the embedding (and the
embedder, with its parameters, that made it) that scores new recordings. Written by the pipeline
once its served recipe is scored, read by nightly rescoring."""

from __future__ import annotations

import time

from asd.io import storage
from asd.io.layout import current_model_uri, embeddings_dir


def set_current_model(root: str, tag: str, embedder: str, params: dict | None = None, **extra) -> str:
    """Name the serving model: embeddings ``<root>/embeddings/<tag>`` and the embedder that made them."""
    info = {"tag": tag, "embedder": embedder, "params": params or {}, "embeddings": embeddings_dir(root, tag),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    return storage.atomic_write_json(current_model_uri(root), info)


def current_model(root: str) -> dict:
    uri = current_model_uri(root)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no serving model: {uri!r} is missing; run the pipeline first (it writes it)")
    return storage.read_json(uri)
