"""One run's storage layout: every folder under a run root is named here, nowhere else.

A run is one storage root (a local folder or ``s3://bucket/prefix``); stages talk only through
it. The README's "What a run writes" shows the tree. (Files inside a stage's own folder, such as
``scores.parquet`` or ``encoder.pt``, are named by that stage.)
"""

from __future__ import annotations

from asd.io import storage


def features_dir(root: str) -> str:
    """Featurized clips: Parquet files named by the commit log ``_log/`` (:mod:`asd.stores.features`)."""
    return storage.join(root, "features")


def manifest_uri(root: str) -> str:
    """Every clip found in the corpus, with its attributes (:mod:`asd.data.manifest`)."""
    return storage.join(root, "manifest", "manifest.parquet")


def embeddings_dir(root: str, tag: str) -> str:
    """One embedding of every featurized clip (:mod:`asd.stages.embed`)."""
    return storage.join(root, "embeddings", tag)


def root_of_embeddings(uri: str) -> str | None:
    """The run root of an embeddings folder laid out by :func:`embeddings_dir` (None for any other path)."""
    parent, _ = uri.rstrip("/").rsplit("/", 1) if "/" in uri.rstrip("/") else ("", uri)
    if not parent or parent.rsplit("/", 1)[-1] != "embeddings":
        return None
    return parent.rsplit("/", 1)[0] if "/" in parent else "."


def labels_dir(root: str, tag: str) -> str:
    """Pseudo-attribute labels clustered from one embedding (:mod:`asd.stages.pseudo_label`)."""
    return storage.join(root, "labels", tag)


def models_dir(root: str, tag: str) -> str:
    """An exported encoder (``encoder.pt``, ``config.json``)."""
    return storage.join(root, "models", tag)


def encoder_uri(root: str, tag: str) -> str:
    """The encoder file of ``models/<tag>`` (:mod:`asd.models.registry`)."""
    return storage.join(models_dir(root, tag), "encoder.pt")


def current_model_uri(root: str) -> str:
    """The serving pointer (:mod:`asd.io.serving`)."""
    return storage.join(root, "models", "CURRENT")


def checkpoints_dir(root: str) -> str:
    """Ray Train runs, one folder per training stage's tag."""
    return storage.join(root, "checkpoints")


def scores_dir(root: str, tag: str) -> str:
    """Scores, DCASE CSVs, metrics and plots of one embedding (:mod:`asd.stages.score`)."""
    return storage.join(root, "scores", tag)


def comparison_uri(root: str, ext: str) -> str:
    """Every scored embedding of a run side by side: ``scores/comparison.{md,png}``."""
    return storage.join(root, "scores", f"comparison.{ext}")


def evaluate_dir(root: str) -> str:
    """An evaluation's report, and the feature view of its training split (:mod:`asd.recipes.evaluate`)."""
    return storage.join(root, "evaluate")


def train_view(root: str) -> str:
    """The training clips' features as a root of their own (what Ray Train reads in an evaluation)."""
    return storage.join(evaluate_dir(root), "train_view")


def rescore_dir(root: str) -> str:
    """Nightly rescoring: one ``date=YYYY-MM-DD`` partition per night (:mod:`asd.stages.rescore`)."""
    return storage.join(root, "rescore")


def rescore_partition_dir(root: str, date: str) -> str:
    return storage.join(rescore_dir(root), f"date={date}")


def rescore_work_dir(root: str, date: str) -> str:
    """A night's featurized and embedded inbox, before its scores are published."""
    return storage.join(rescore_dir(root), "_work", f"date={date}")


def rescore_lease_uri(root: str) -> str:
    """The lease that serialises nightly runs' "what is new, score it, publish" (:class:`asd.io.commitlog.Lease`)."""
    return storage.join(rescore_dir(root), "_lease")


def ae_root(root: str) -> str:
    """The autoencoder baseline's own feature set and models (``<root>/baselines/ae``)."""
    return storage.join(root, "baselines", "ae")


def training_view(features_root: str) -> str:
    """A feature root's training clips as a feature root of their own, beside it (the autoencoder's,
    under :func:`ae_root`)."""
    return storage.join(features_root, "train_view")
