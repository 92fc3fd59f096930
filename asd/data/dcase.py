"""DCASE Task 2 file names (2020 to 2025) and ``attributes_<ss>.csv`` files.

File-name forms, all parsed by :func:`parse_name`:

=========================  ==================================================================
form                       example
=========================  ==================================================================
``dcase2021``              ``section_00_source_train_normal_0001_vel_8_loc_B.wav`` (2021-2025;
                           the attribute suffix may be ``noAttribute`` or absent)
``eval``                   ``section_00_0042.wav`` (evaluation test clips: domain and label unknown)
``dcase2020``              ``normal_id_00_00000000.wav`` / ``anomaly_id_02_00000007.wav``
``dcase2020_eval``         ``id_05_00000012.wav``
=========================  ==================================================================

The attribute suffix of a 2021+ name is ``key_value`` pairs separated by ``_``
(``car_C2_spd_34V_mic_1``). Some types do not follow that (RoboticArm's
``weight00_BckgA``); an odd number of tokens is kept as positional keys
``p1, p2, ...`` and the raw suffix is always kept as ``attribute_string``. Where
an ``attributes_<ss>.csv`` (``file_name,d1p,d1v,d2p,d2v,...``) lists a file, its
pairs win over the name.
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "test")
SOURCE, TARGET = "source", "target"
DOMAINS = (SOURCE, TARGET)
LABELS = ("normal", "anomaly")

_DCASE2021 = re.compile(
    r"^section_(?P<section>\d{2})_(?P<domain>source|target)_(?P<split>train|test)_"
    r"(?P<label>normal|anomaly)_(?P<index>\d+)(?:_(?P<attrs>.+))?$"
)
_EVAL = re.compile(r"^section_(?P<section>\d{2})_(?P<index>\d+)$")
_DCASE2020 = re.compile(r"^(?P<label>normal|anomaly)_id_(?P<section>\d{2})_(?P<index>\d+)$")
_DCASE2020_EVAL = re.compile(r"^id_(?P<section>\d{2})_(?P<index>\d+)$")
_ATTRIBUTES_CSV = re.compile(r"^attributes_(?P<section>\d{2})\.csv$")

NO_ATTRIBUTE = "noAttribute"


class NameError_(ValueError):
    """A file name that matches no DCASE form."""


@dataclass(frozen=True)
class ClipName:
    """What a DCASE file name says about a clip (None where the name does not say)."""

    section: str
    domain: str | None
    split: str | None
    label: str | None
    clip_index: int
    attribute_string: str | None
    attributes: dict[str, str] = field(default_factory=dict)
    name_format: str = "dcase2021"


def parse_attribute_string(text: str | None) -> dict[str, str]:
    """``"vel_8_loc_B"`` -> ``{"vel": "8", "loc": "B"}``; odd token counts become ``p1..pn``."""
    if not text or text == NO_ATTRIBUTE:
        return {}
    tokens = text.split("_")
    if len(tokens) % 2 == 0:
        return {tokens[i]: tokens[i + 1] for i in range(0, len(tokens), 2)}
    return {f"p{i + 1}": tok for i, tok in enumerate(tokens)}


def parse_name(file_name: str) -> ClipName:
    """Parse a DCASE clip file name (base name, with or without ``.wav``).

    Raises :class:`NameError_` for a name that matches no known form.
    """
    stem = posixpath.basename(file_name)
    if stem.lower().endswith(".wav"):
        stem = stem[:-4]
    if m := _DCASE2021.match(stem):
        attrs = m["attrs"]
        return ClipName(
            section=m["section"],
            domain=m["domain"],
            split=m["split"],
            label=m["label"],
            clip_index=int(m["index"]),
            attribute_string=attrs,
            attributes=parse_attribute_string(attrs),
            name_format="dcase2021",
        )
    if m := _EVAL.match(stem):
        return ClipName(m["section"], None, None, None, int(m["index"]), None, {}, "eval")
    if m := _DCASE2020.match(stem):
        return ClipName(m["section"], None, None, m["label"], int(m["index"]), None, {}, "dcase2020")
    if m := _DCASE2020_EVAL.match(stem):
        return ClipName(m["section"], None, None, None, int(m["index"]), None, {}, "dcase2020_eval")
    raise NameError_(f"file name {file_name!r} matches no DCASE Task 2 naming form")


def attributes_csv_section(file_name: str) -> str | None:
    """``"attributes_00.csv"`` -> ``"00"``; None for any other name."""
    m = _ATTRIBUTES_CSV.match(posixpath.basename(file_name))
    return m["section"] if m else None


def parse_attributes_csv(text: str) -> dict[str, dict[str, str]]:
    """Read an official ``attributes_<ss>.csv``: base file name -> {attribute: value}.

    The header is ``file_name,d1p,d1v,d2p,d2v,...``; empty trailing pairs are ignored.
    """
    reader = csv.reader(io.StringIO(text))
    rows = list(reader)
    if not rows:
        return {}
    header = [h.strip() for h in rows[0]]
    if not header or header[0] != "file_name":
        raise ValueError(f"attributes csv header must start with 'file_name', got {header[:3]}")
    out: dict[str, dict[str, str]] = {}
    for row in rows[1:]:
        if not row or not row[0].strip():
            continue
        attrs: dict[str, str] = {}
        for i in range(1, len(row) - 1, 2):
            key, value = row[i].strip(), row[i + 1].strip()
            if key and key != NO_ATTRIBUTE:
                attrs[key] = value
        out[posixpath.basename(row[0].strip())] = attrs
    return out


def format_name(
    section: str,
    domain: str,
    split: str,
    label: str,
    index: int,
    attributes: dict[str, str] | None = None,
) -> str:
    """Build a DCASE 2021-2025 file name; ``attributes=None/{}`` gives ``noAttribute``."""
    if attributes:
        suffix = "_".join(f"{k}_{v}" for k, v in attributes.items())
    else:
        suffix = NO_ATTRIBUTE
    return f"section_{section}_{domain}_{split}_{label}_{index:04d}_{suffix}.wav"


# ----------------------------------------------------------------------------- values in tables
# Domain, label and section values as scoring, metrics and plots take them (strings of the file names,
# 0/1, None); one rule for every reader.


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return isinstance(value, (float, np.floating)) and math.isnan(value)
    except TypeError:
        return False


def normalize_label(value: Any) -> int | None:
    """``"normal"``/0 -> 0, ``"anomaly"``/1 -> 1, ``None``/NaN -> ``None`` (unlabelled)."""
    if is_missing(value):
        return None
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode()
    if isinstance(value, str):
        key = value.strip().lower()
        if key in ("normal", "0"):
            return 0
        if key in ("anomaly", "anomalous", "abnormal", "1"):
            return 1
        if key in ("", "none", "unknown", "nan"):
            return None
        raise ValueError(f"unknown label {value!r} (expected 'normal'/'anomaly' or 0/1)")
    if isinstance(value, (bool, np.bool_, int, np.integer, float, np.floating)):
        if value == 0:
            return 0
        if value == 1:
            return 1
    raise ValueError(f"unknown label {value!r} (expected 'normal'/'anomaly' or 0/1)")


def normalize_domain(value: Any) -> str:
    """``"source"``/0/``None`` -> ``"source"``, ``"target"``/1 -> ``"target"``.

    A missing domain (DCASE 2020-style file names) counts as source.
    """
    if is_missing(value):
        return SOURCE
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode()
    if isinstance(value, str):
        key = value.strip().lower()
        if key in ("source", "src", "s", "0", "", "none"):
            return SOURCE
        if key in ("target", "tgt", "t", "1"):
            return TARGET
        raise ValueError(f"unknown domain {value!r} (expected 'source'/'target' or None)")
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        if value == 0:
            return SOURCE
        if value == 1:
            return TARGET
    raise ValueError(f"unknown domain {value!r} (expected 'source'/'target' or None)")


def normalize_section(value: Any) -> str:
    """Section id as the two-digit string of the file names: ``0``, ``"section_00"`` -> ``"00"``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):02d}"
    text = str(value).strip()
    if text.startswith("section_"):
        text = text[len("section_"):]
    if text.isdigit() and len(text) < 2:
        text = text.zfill(2)
    return text
