"""One run's storage layout: every folder under a run root is named here, nowhere else.

A run is one storage root (a local folder or ``s3://bucket/prefix``); stages talk only through
it. The README's "What a run writes" shows the tree.
"""

from __future__ import annotations

from asd import storage


def features_dir(root: str) -> str:
    """Featurized clips: Parquet files named by the commit log ``_log/`` (:mod:`asd.features`)."""
    return storage.join(root, "features")


def embeddings_dir(root: str, tag: str) -> str:
    """One embedding of every featurized clip (:mod:`asd.embed`)."""
    return storage.join(root, "embeddings", tag)


def labels_dir(root: str, tag: str) -> str:
    """Pseudo-attribute labels clustered from one embedding (:mod:`asd.cluster`)."""
    return storage.join(root, "labels", tag)


def models_dir(root: str, tag: str) -> str:
    """An exported encoder (``encoder.pt``, ``config.json``)."""
    return storage.join(root, "models", tag)


def current_model_uri(root: str) -> str:
    """The serving pointer (:mod:`asd.serving`)."""
    return storage.join(root, "models", "CURRENT")


def checkpoints_dir(root: str) -> str:
    """Ray Train runs, one folder per training stage's tag."""
    return storage.join(root, "checkpoints")


def scores_dir(root: str, tag: str) -> str:
    """Scores, DCASE CSVs, metrics and plots of one embedding (:mod:`asd.score`)."""
    return storage.join(root, "scores", tag)


def rescore_dir(root: str) -> str:
    """Nightly rescoring: one ``date=YYYY-MM-DD`` partition per night (:mod:`asd.rescore`)."""
    return storage.join(root, "rescore")


def rescore_partition_dir(root: str, date: str) -> str:
    return storage.join(rescore_dir(root), f"date={date}")


def ae_root(root: str) -> str:
    """The autoencoder baseline's own feature set and models (``<root>/baselines/ae``)."""
    return storage.join(root, "baselines", "ae")
