"""Every encoder architecture and its checkpoint file, in one registry.

:data:`ARCHS` maps an architecture name to its config and module classes: ``transformer``
(:class:`asd.models.encoder.AudioEncoder`, BEATs-compatible), ``cnn`` (:class:`asd.models.cnn.CNNEncoder`,
log-mel crops) and ``mod`` (:class:`asd.models.modnet.ModEncoder`, the modulation spectrum).
Every stage that takes an encoder takes any of them through :func:`load_checkpoint`.

A checkpoint file of this project is ``{"asd_encoder": 1, "arch", "cfg", "model", "meta"}``
(:func:`save_checkpoint`); a released BEATs file (``{"cfg": BEATsConfig dict, "model": ...}``, no
``arch``) loads as a transformer, keys missing from its ``cfg`` taking BEATs' defaults.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from dataclasses import asdict, fields, replace

import torch
import torch.nn as nn

from asd.io import storage
from asd.models import cnn, modnet
from asd.models.encoder import (
    TRANSFORMER,
    AudioEncoder,
    EncoderConfig,
    beats_state_dict_from,
    config_from_beats,
    fill_tied_relative_bias,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # value of "asd_encoder" in this project's checkpoint files
ARCHS: dict[str, tuple[type, type]] = {
    TRANSFORMER: (EncoderConfig, AudioEncoder),
    cnn.ARCH: (cnn.CNNConfig, cnn.CNNEncoder),
    modnet.ARCH: (modnet.ModConfig, modnet.ModEncoder),
}
SCRATCH = (cnn.ARCH, modnet.ARCH)  # the architectures fine-tuning trains from scratch (``FinetuneConfig.model``)


def config_from_dict(arch: str, d: dict, source: str = "dict"):
    """The config of ``arch`` from a dict of its fields. Unknown keys are an error, except for the
    transformer, whose BEATs files carry keys it does not use (logged and ignored)."""
    if arch not in ARCHS:
        raise ValueError(f"{source}: unknown encoder architecture {arch!r} (known: {sorted(ARCHS)})")
    cls = ARCHS[arch][0]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown and arch != TRANSFORMER:
        raise ValueError(f"{source}: unknown {arch} config keys {unknown}")
    if unknown:
        log.debug("%s: ignoring config keys not used by EncoderConfig: %s", source, unknown)
    return cls(**{k: v for k, v in d.items() if k in names})


def build(cfg) -> nn.Module:
    """A new, randomly initialised encoder for a config of any architecture."""
    for config_cls, module_cls in ARCHS.values():
        if isinstance(cfg, config_cls):
            return module_cls(cfg)
    raise TypeError(f"not an encoder config: {type(cfg).__name__}")


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "_orig_mod") or (hasattr(model, "module") and isinstance(model.module, nn.Module)):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def _strip_prefixes(sd: dict) -> dict:
    for prefix in ("_orig_mod.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def save_checkpoint(model: nn.Module, uri: str, meta: dict | None = None) -> str:
    """Write ``{"asd_encoder": 1, "arch", "cfg", "model", "meta"}`` atomically to a path or fsspec
    URI (``arch`` from the model's config: transformer, cnn or mod)."""
    core = _unwrap(model)
    payload = {
        "asd_encoder": FORMAT_VERSION,
        "arch": getattr(core.cfg, "arch", TRANSFORMER),
        "cfg": asdict(core.cfg),
        "model": {k: v.detach().cpu() for k, v in beats_state_dict_from(core).items()},
        # JSON round trip: meta must stay loadable with torch.load(weights_only=True)
        "meta": json.loads(json.dumps(meta or {}, default=str)),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return storage.atomic_write_bytes(uri, buffer.getvalue())


def load_checkpoint(
    path_or_uri: str, map_location="cpu", strict: bool = True, keep_predictor: bool = True
) -> nn.Module:
    """Build the encoder a checkpoint file describes, of any architecture (see the module docstring).

    Reads local paths and fsspec URIs (s3://) with ``torch.load(weights_only=True)``.
    strict: any missing / unexpected key or shape mismatch raises ValueError naming them;
    otherwise (transformer only) matching tensors are loaded and the rest is logged; the CNNs
    always load strictly. keep_predictor=False drops a fine-tuned BEATs checkpoint's
    classification head. Returns the model in eval mode (on ``map_location`` when that is a
    device), with the file's ``meta`` (own format) in ``model.meta``.
    """
    fs, path = storage.filesystem(path_or_uri)
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path_or_uri}: not loadable with torch.load(weights_only=True): {exc}") from exc

    if not isinstance(ckpt, dict) or "cfg" not in ckpt or "model" not in ckpt:
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path_or_uri}: not an encoder checkpoint (expected 'cfg' and 'model', found {keys})")
    if "asd_encoder" in ckpt:
        if int(ckpt["asd_encoder"]) > FORMAT_VERSION:
            raise ValueError(f"{path_or_uri}: checkpoint format {ckpt['asd_encoder']} is newer than {FORMAT_VERSION}")
        arch = ckpt.get("arch", TRANSFORMER)
        cfg = config_from_dict(arch, dict(ckpt["cfg"]), source=str(path_or_uri))
    else:
        arch, cfg = TRANSFORMER, config_from_beats(dict(ckpt["cfg"]))
    state = _strip_prefixes(dict(ckpt["model"]))
    if arch == TRANSFORMER:
        if not keep_predictor:
            cfg = replace(cfg, finetuned_model=False)
            state = {k: v for k, v in state.items() if not k.startswith("predictor.")}
        state = fill_tied_relative_bias(state, cfg)
    else:
        strict = True
    model = build(cfg)
    missing, unexpected, mismatched = _compare_state(model, state)
    if missing or unexpected or mismatched:
        message = _mismatch_message(path_or_uri, missing, unexpected, mismatched)
        if strict:
            raise ValueError(message)
        log.warning("%s", message)
        bad = set(unexpected) | {k for k, _, _ in mismatched}
        state = {k: v for k, v in state.items() if k not in bad}
    model.load_state_dict(state, strict=False)
    model.meta = dict(ckpt.get("meta") or {})
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def _compare_state(model: nn.Module, state: dict) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, mismatched


def _mismatch_message(uri: str, missing: list, unexpected: list, mismatched: list, limit: int = 10) -> str:
    parts = [f"checkpoint {uri} does not match the encoder it describes:"]
    if missing:
        parts.append(f"{len(missing)} missing keys {missing[:limit]}{' ...' if len(missing) > limit else ''}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {unexpected[:limit]}{' ...' if len(unexpected) > limit else ''}")
    if mismatched:
        shown = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched[:limit]]
        parts.append(f"{len(mismatched)} shape mismatches [{'; '.join(shown)}]{' ...' if len(mismatched) > limit else ''}")
    return " ".join(parts)


__all__ = ["ARCHS", "FORMAT_VERSION", "SCRATCH", "build", "config_from_dict", "load_checkpoint", "save_checkpoint"]
