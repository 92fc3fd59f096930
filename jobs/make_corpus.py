"""Generate a DCASE-like corpus: ``python -m jobs.make_corpus [out=DIR|s3://...] data.spec.seed=1``.

``data=synthetic`` (the default) uses :mod:`asd.data.synthetic`; a data config with
``generator: realistic`` (``data=realistic``, ``data=realistic_small``) uses the frozen presets of
:mod:`asd.data.realistic` (``spec.preset`` names one; only scalar fields such as ``seed`` may be
overridden).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from asd.data.synthetic import default_spec, make_corpus
from asd.io import storage
from jobs import schema
from jobs.common import final_line, log, refuse_path_as_data, setup_logging

schema.register("device")

MARKER = "_CORPUS.json"
GENERATORS = ("synthetic", "realistic")


def build_spec(data: DictConfig):
    """(spec, make_corpus function) for the data config's ``generator`` (default synthetic)."""
    generator = str(data.get("generator", "synthetic") or "synthetic")
    node = OmegaConf.to_container(data.get("spec") or {}, resolve=True)
    if generator == "synthetic":
        return default_spec(**node), make_corpus
    if generator == "realistic":
        from asd.data import realistic

        preset = node.pop("preset", "realistic")
        overrides = {k: v for k, v in node.items() if v is not None}  # null: the preset's own value
        return realistic.preset_spec(preset, **overrides), realistic.make_corpus
    raise ValueError(f"data.generator must be one of {GENERATORS}, got {generator!r}")


def run(cfg: DictConfig) -> dict:
    out = cfg.get("out") or cfg.data.input
    spec, make = build_spec(cfg.data)
    marker = storage.join(out, MARKER)
    if storage.exists(marker) and storage.read_json(marker).get("spec") == _spec_dict(spec):
        log.info("corpus already generated at %s (same spec); nothing to do", out)
        return {"stage": "make_corpus", "corpus": out, "skipped": True}
    info = make(spec, out, workers=int(cfg.data.get("workers", 1)), progress=True)
    storage.atomic_write_json(marker, {"spec": _spec_dict(spec), "n_clips": info.n_clips, "counts": info.counts})
    log.info("wrote %d clips to %s", info.n_clips, out)
    return {"stage": "make_corpus", "corpus": out, "n_clips": info.n_clips, "skipped": False}


def _spec_dict(spec) -> dict:
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))


@hydra.main(version_base="1.3", config_path="conf", config_name="make_corpus")
def main(cfg: DictConfig) -> None:
    setup_logging(cfg.log_level)
    final_line(run(cfg))


if __name__ == "__main__":
    refuse_path_as_data()
    main()
