"""Deterministic synthetic DCASE-like machine-sound corpus.

The corpus mimics DCASE 2023-2025 Task 2 (first-shot, domain-generalisation) data:
``<root>/<type>/{train,test}/section_<ss>_<domain>_<split>_<label>_<iiii>_<attrs>.wav``
plus ``<root>/<type>/attributes_<ss>.csv`` for machine types that have attributes.

Sound model (:func:`synth_clip`), per clip:

* **machine tone**: a harmonic stack whose fundamental is ``speed / 60 * order`` Hz
  (``speed`` attribute, rpm; ``order`` = blades/teeth of the type), with a slow random
  frequency wander and a fixed per-type/section harmonic "timbre";
* **load** attribute: amplitude-modulation depth and rate of the tone, and the level
  of a band-limited "flow" noise that belongs to the machine;
* **mic** attribute (where a type has it): harmonic roll-off (spectral tilt);
* **background**: coloured noise; the ``target`` domain has louder, whiter noise and
  speeds never seen in ``source``;
* small per-clip jitter everywhere (fundamental, harmonic amplitudes, noise level, gain),
  so clips with equal attributes are similar and different attributes form clusters.

Types with ``attributes=False`` still vary by (hidden) speed/load; their names just say
``noAttribute`` - this is what pseudo-attribute clustering has to recover.

Anomalies (test split only, half of the test clips per domain), kind drawn per clip:
``clicks`` (bearing impulse trains), ``drift`` (fundamental slides over the clip),
``tone`` (an extra inharmonic partial), ``rattle`` (amplitude-modulated broadband bursts).
``anomaly_strength`` scales all of them; at 0 an anomalous clip is drawn from the
normal distribution.

Every clip has its own RNG seeded from ``(seed, type, section, domain, split, label,
index)`` (CRC32 of strings, not the salted ``hash()``), so the corpus is byte-identical
for the same spec whatever ``workers`` is, and normal clips do not depend on
``anomaly_strength``.

Separability observed (seed 0; embedding = L2-normalised per-mel-bin mean+std of a
128-bin Kaldi fbank; score = min cosine distance to the source+target train clips of
the type; AUC per type and domain, averaged over the 4 default types). The default spec
has only 10 normal + 10 anomalous test clips per type and domain, so its numbers are
noisy (about +-0.05); the ``n_test=100`` columns are the better estimate:

=========  ==================  ====================  =====================
strength   default spec, 2 s   n_test=100, 2 s       n_test=100, 10 s
           source / target     source / target       source / target
=========  ==================  ====================  =====================
0.0        0.51 / 0.46         0.50 / 0.51           -
0.3        0.63 / 0.47         0.60 / 0.52           0.63 / 0.52
1.0        0.85 / 0.63         0.87 / 0.70           0.88 / 0.75
3.0        0.93 / 0.93         0.97 / 0.96           0.97 / 0.97
=========  ==================  ====================  =====================

Per anomaly kind at strength 1 (2 s, n_test=100), source / target: clicks 0.79 / 0.57,
drift 0.77 / 0.77, tone 0.94 / 0.84, rattle 0.98 / 0.64 - the louder, whiter target
noise masks the impulsive kinds. Synthesis takes about 14-20 ms per 10 s clip (one core).
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context

import numpy as np
import soundfile as sf

from asd.data.dcase import DOMAINS, LABELS, NO_ATTRIBUTE, SPLITS
from asd.io import storage

ANOMALY_KINDS = ("clicks", "drift", "tone", "rattle")

# Background noise per domain: (level in dB relative to the machine RMS, spectral slope
# exponent beta of a 1/f^beta power spectrum).
_BACKGROUND = {"source": (-14.0, 1.0), "target": (-8.0, 0.5)}


@dataclass
class MachineSpec:
    """One synthetic machine type.

    ``source_speeds`` / ``target_speeds`` / ``loads`` / ``mics`` are the discrete attribute
    values; an empty tuple drops that attribute (``mics=()`` is the default).
    """

    name: str
    attributes: bool = True
    source_speeds: tuple[int, ...] = (1200, 1500, 1800)  # rpm, source domain
    target_speeds: tuple[int, ...] = (2100, 2400)  # rpm, never seen in source
    loads: tuple[int, ...] = (30, 60)  # percent: AM depth/rate and flow-noise level
    mics: tuple[int, ...] = ()  # microphone position: harmonic roll-off
    order: int = 8  # fundamental = speed / 60 * order (blades, gear teeth ...)
    n_harmonics: int = 10
    rolloff: float = 1.0  # base harmonic amplitude slope, amplitude ~ k^-rolloff
    flow_band: tuple[float, float] = (800.0, 4000.0)  # Hz, band of the machine's own noise
    flow_level: float = 0.4  # flow-noise RMS relative to the tone at load 100
    timbre: int = 0  # seeds the fixed harmonic pattern (shifted per section)

    def attribute_values(self, domain: str) -> dict[str, tuple[int, ...]]:
        """Attribute name -> the values used in ``domain`` (dropping empty attributes)."""
        speeds = self.source_speeds if domain == "source" else self.target_speeds
        values = {"speed": speeds, "load": self.loads, "mic": self.mics}
        return {k: v for k, v in values.items() if v}


def _default_machines() -> list[MachineSpec]:
    return [
        MachineSpec("fanlike"),
        MachineSpec(
            "pumplike", source_speeds=(900, 1200), target_speeds=(1500,), loads=(40, 80),
            mics=(1, 2), order=6, n_harmonics=12, rolloff=0.8, flow_band=(200.0, 1500.0),
            flow_level=0.3, timbre=1,
        ),
        MachineSpec(
            "gearlike", attributes=False, source_speeds=(600, 900, 1200),
            target_speeds=(1500, 1800), loads=(20, 70), order=20, n_harmonics=8,
            rolloff=0.6, flow_band=(2000.0, 6000.0), flow_level=0.15, timbre=2,
        ),
        MachineSpec(
            "sliderlike", source_speeds=(300, 450, 600), target_speeds=(750,), loads=(),
            mics=(1, 2, 3), order=30, n_harmonics=10, rolloff=1.2,
            flow_band=(400.0, 2500.0), flow_level=0.25, timbre=3,
        ),
    ]


@dataclass
class CorpusSpec:
    """What to generate; clip counts are per machine type and section."""

    machine_types: list[MachineSpec] = field(default_factory=_default_machines)
    sections: tuple[str, ...] = ("00",)
    n_train_source: int = 40
    n_train_target: int = 4
    n_test_per_domain: int = 20  # half normal, half anomaly (anomaly = n // 2)
    duration_s: float = 2.0
    sample_rate: int = 16000
    anomaly_strength: float = 1.0
    seed: int = 0


@dataclass
class CorpusInfo:
    """What :func:`make_corpus` wrote."""

    root: str
    n_clips: int
    counts: dict  # {"<type>": {"train": n, "test": n}}
    files: list[str]  # "<type>/<split>/<file>.wav", in generation order


@dataclass(frozen=True)
class _Clip:
    """One clip to render (picklable job for the worker pool)."""

    machine: MachineSpec  # already specialised to the section
    section: str
    domain: str
    split: str
    label: str
    index: int
    attrs: dict[str, str]
    relpath: str


def default_spec(**overrides) -> CorpusSpec:
    """The default :class:`CorpusSpec` with some fields replaced.

    Accepts plain config values too (e.g. from YAML): ``sections`` as a list and
    ``machine_types`` as a list of :class:`MachineSpec` keyword dicts.
    """
    if "sections" in overrides:
        overrides["sections"] = tuple(str(s) for s in overrides["sections"])
    if "machine_types" in overrides:
        overrides["machine_types"] = [
            m if isinstance(m, MachineSpec)
            else MachineSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})
            for m in overrides["machine_types"]
        ]
    return CorpusSpec(**overrides)


# ----------------------------------------------------------------------------- synthesis


def _slow_noise(rng: np.random.Generator, n: int, knots_per_s: float, duration_s: float) -> np.ndarray:
    """Smooth zero-mean unit-scale random curve of length ``n`` (linear interpolation)."""
    n_knots = max(2, int(np.ceil(duration_s * knots_per_s)) + 1)
    knots = rng.standard_normal(n_knots)
    return np.interp(np.linspace(0.0, n_knots - 1, n), np.arange(n_knots), knots)


def _pulses(n: int, positions: np.ndarray, amps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Sum of ``amps[i] * kernel`` placed at ``positions[i]`` (clipped at the end)."""
    out = np.zeros(n)
    idx = positions[:, None] + np.arange(len(kernel))[None, :]
    vals = amps[:, None] * kernel[None, :]
    keep = idx < n
    np.add.at(out, idx[keep], vals[keep])
    return out


def _harmonic_weights(machine: MachineSpec, mic: float) -> np.ndarray:
    """Fixed per-type timbre times the roll-off set by the ``mic`` attribute."""
    k = np.arange(1, machine.n_harmonics + 1)
    pattern = np.random.default_rng([machine.timbre, 7]).uniform(0.4, 1.0, machine.n_harmonics)
    return pattern * k ** -(machine.rolloff + 1.0 * (mic - 1.0))


def synth_clip(
    machine: MachineSpec,
    attrs: dict[str, str],
    domain: str,
    anomaly: str | None,
    rng: np.random.Generator,
    duration_s: float,
    sample_rate: int,
    strength: float,
) -> np.ndarray:
    """Synthesize one clip: float32 mono with peak in [0.5, 0.8].

    ``attrs`` holds ``speed`` (rpm) and optionally ``load`` (%) and ``mic`` (1, 2, ...);
    ``anomaly`` is None or one of :data:`ANOMALY_KINDS`, scaled by ``strength``.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if anomaly is not None and anomaly not in ANOMALY_KINDS:
        raise ValueError(f"anomaly must be None or one of {ANOMALY_KINDS}, got {anomaly!r}")
    sr = sample_rate
    n = int(round(duration_s * sr))
    t = np.arange(n) / sr
    speed = float(attrs["speed"])
    load = float(attrs.get("load", 0)) / 100.0
    mic = float(attrs.get("mic", 1))

    # Machine tone: harmonic stack on a wandering fundamental, amplitude-modulated by load.
    f0 = speed / 60.0 * machine.order * (1.0 + 0.004 * rng.standard_normal())
    freq = f0 * (1.0 + 0.002 * _slow_noise(rng, n, 4.0, duration_s))
    if anomaly == "drift":
        slide = strength * rng.uniform(0.02, 0.04) * rng.choice([-1.0, 1.0])
        freq = freq * (1.0 + slide * (2.0 * t / duration_s - 1.0))
    phase = np.mod(2.0 * np.pi * np.cumsum(freq) / sr, 2.0 * np.pi).astype(np.float32)
    k = np.arange(1, machine.n_harmonics + 1)
    weights = _harmonic_weights(machine, mic) * np.exp(0.1 * rng.standard_normal(len(k)))
    weights[k * freq.max() >= 0.48 * sr] = 0.0  # no aliasing
    offsets = rng.uniform(0.0, 2.0 * np.pi, len(k)).astype(np.float32)
    partials = np.sin(k.astype(np.float32)[:, None] * phase[None, :] + offsets[:, None])
    tone = np.einsum("h,hn->n", weights.astype(np.float32), partials)  # no BLAS threads
    am_rate = (2.0 + 8.0 * load) * rng.uniform(0.9, 1.1)
    am_depth = 0.05 + 0.8 * load
    tone = tone * (1.0 + am_depth * np.sin(2.0 * np.pi * am_rate * t + rng.uniform(0, 2 * np.pi)))
    tone_rms = np.sqrt(np.mean(tone**2)) + 1e-12

    # Flow noise of the machine plus background noise, shaped in one FFT.
    f = np.fft.rfftfreq(n, 1.0 / sr)
    lo, hi = machine.flow_band
    flow_gain = np.exp(-0.5 * (np.log(np.maximum(f, 1.0) / np.sqrt(lo * hi)) / np.log(hi / lo) * 3.0) ** 2)
    flow_gain *= machine.flow_level * (0.2 + 1.5 * load) * tone_rms / np.sqrt(np.mean(flow_gain**2))
    level_db, beta = _BACKGROUND[domain]
    level_db += rng.uniform(-2.0, 2.0)
    bg_gain = np.maximum(f, 20.0) ** (-beta / 2.0)
    bg_gain *= 10 ** (level_db / 20.0) * tone_rms / np.sqrt(np.mean(bg_gain**2))
    shaped = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * np.hypot(flow_gain, bg_gain), n)
    x = tone + shaped

    if anomaly is not None and anomaly != "drift":
        x = x + strength * tone_rms * _anomaly_component(anomaly, rng, n, sr, f0, speed, duration_s)

    peak = np.max(np.abs(x)) + 1e-12
    return (x * (rng.uniform(0.5, 0.8) / peak)).astype(np.float32)


def _anomaly_component(
    kind: str, rng: np.random.Generator, n: int, sr: int, f0: float, speed: float, duration_s: float
) -> np.ndarray:
    """Additive anomaly signal relative to a unit-RMS machine tone (``drift`` is not additive)."""
    t = np.arange(n) / sr
    if kind == "clicks":
        # Bearing defect: decaying resonances at a few times the shaft rate, timing jitter.
        rate = speed / 60.0 * rng.uniform(0.2, 0.6)
        period = sr / rate
        positions = np.arange(rng.uniform(0, period), n, period)
        positions = np.clip(positions + rng.normal(0, 0.02 * period, len(positions)), 0, n - 1).astype(int)
        kt = np.arange(int(0.006 * sr)) / sr
        kernel = np.exp(-kt / 0.0012) * np.sin(2 * np.pi * rng.uniform(2500, 5000) * kt)
        return 2.0 * _pulses(n, positions, rng.uniform(0.6, 1.0, len(positions)), kernel)
    if kind == "tone":
        # Extra inharmonic partial (e.g. a resonance or a damaged blade).
        fx = f0 * (rng.integers(2, 7) + rng.uniform(0.25, 0.75))
        return 0.2 * np.sin(2 * np.pi * fx * t + rng.uniform(0, 2 * np.pi))
    if kind == "rattle":
        # Loose part: short broadband bursts, amplitude-modulated at a rattle rate.
        n_bursts = max(1, rng.poisson(4.0 * duration_s))
        starts = rng.integers(0, n, n_bursts)
        win = np.hanning(int(0.05 * sr))
        env = _pulses(n, starts, rng.uniform(0.5, 1.0, n_bursts), win)
        am = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(25, 60) * t)
        noise = np.diff(rng.standard_normal(n + 1))  # first difference: high-tilted
        return 0.8 * env * am * noise
    raise ValueError(f"unknown additive anomaly kind {kind!r}")


# ----------------------------------------------------------------------------- corpus


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _clip_rng(seed: int, clip: _Clip) -> np.random.Generator:
    """Independent, reproducible RNG for one clip (independent of order and workers)."""
    key = [
        seed, _crc(clip.machine.name), _crc(clip.section), DOMAINS.index(clip.domain),
        SPLITS.index(clip.split), LABELS.index(clip.label), clip.index,
    ]
    return np.random.default_rng(key)


def _file_name(section: str, domain: str, split: str, label: str, index: int, attrs: dict[str, str] | None) -> str:
    suffix = "_".join(f"{k}_{v}" for k, v in attrs.items()) if attrs else NO_ATTRIBUTE
    return f"section_{section}_{domain}_{split}_{label}_{index:04d}_{suffix}.wav"


def _plan(spec: CorpusSpec):
    """Yield every clip of the corpus in a fixed order (type, section, split, domain, label, index)."""
    return plan_clips(spec, lambda machine, section: replace(machine, timbre=machine.timbre * 100 + int(section)),
                      _Clip)


def plan_clips(spec, machine_for_section, clip_cls):
    """Every clip of ``spec`` (clip counts per split/domain/label, attribute combinations in turn,
    DCASE file names) in a fixed order (type, section, split, domain, label, index), as
    ``clip_cls(machine_for_section(machine, section), section, domain, split, label, index, attrs,
    relpath)``. Shared by the generated corpora (``asd.data.realistic`` too)."""
    for machine in spec.machine_types:
        for section in spec.sections:
            sec_machine = machine_for_section(machine, section)
            for split in SPLITS:
                for domain in DOMAINS:
                    values = machine.attribute_values(domain)
                    combos = [dict(zip(values, map(str, c))) for c in itertools.product(*values.values())]
                    if split == "train":
                        n = spec.n_train_source if domain == "source" else spec.n_train_target
                        per_label = {"normal": n, "anomaly": 0}
                    else:
                        n_anom = spec.n_test_per_domain // 2
                        per_label = {"normal": spec.n_test_per_domain - n_anom, "anomaly": n_anom}
                    for label in LABELS:
                        for index in range(per_label[label]):
                            attrs = combos[index % len(combos)]
                            name = _file_name(section, domain, split, label, index,
                                              attrs if machine.attributes else None)
                            yield clip_cls(sec_machine, section, domain, split, label, index, attrs,
                                           f"{machine.name}/{split}/{name}")


def _validate(spec: CorpusSpec) -> None:
    names = [m.name for m in spec.machine_types]
    if len(set(names)) != len(names):
        raise ValueError(f"machine type names must be unique, got {names}")
    for section in spec.sections:
        if not re.fullmatch(r"\d\d", section):
            raise ValueError(f"sections must be two digits like '00', got {section!r}")
    for m in spec.machine_types:
        if not m.source_speeds or not m.target_speeds:
            raise ValueError(f"{m.name}: source_speeds and target_speeds must not be empty")
        if not m.name or "/" in m.name:
            raise ValueError(f"machine type name {m.name!r} must be a non-empty name without '/'")


def _render(job: tuple[CorpusSpec, str, _Clip]) -> str:
    """Synthesize one clip and write it as 16-bit PCM WAV; return its relative path."""
    spec, root, clip = job
    rng = _clip_rng(spec.seed, clip)
    anomaly = ANOMALY_KINDS[rng.integers(len(ANOMALY_KINDS))] if clip.label == "anomaly" else None
    wave = synth_clip(clip.machine, clip.attrs, clip.domain, anomaly, rng,
                      spec.duration_s, spec.sample_rate, spec.anomaly_strength)
    buf = io.BytesIO()
    sf.write(buf, wave, spec.sample_rate, subtype="PCM_16", format="WAV")
    storage.atomic_write_bytes(storage.join(root, clip.relpath), buf.getvalue())
    return clip.relpath


def _attributes_csv(clips: list[_Clip]) -> str:
    """Official ``attributes_<ss>.csv`` text for the clips of one type and section."""
    n_attr = max(len(c.attrs) for c in clips)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file_name"] + [f"d{i}{s}" for i in range(1, n_attr + 1) for s in "pv"])
    for c in clips:
        writer.writerow([c.relpath] + [x for kv in c.attrs.items() for x in kv])
    return out.getvalue()


def _progress(iterable, total: int, enabled: bool):
    """Wrap ``iterable`` in a tqdm bar when asked and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="synth corpus", unit="clip")


def make_corpus(spec: CorpusSpec, out: str, workers: int = 1, progress: bool = True) -> CorpusInfo:
    """Write the corpus described by ``spec`` under ``out`` (local path or ``s3://`` URI).

    Clips are synthesized one at a time, so memory stays flat for any corpus size.
    ``workers > 1`` uses a *spawned* process pool (safe with threads in the caller), so
    the calling script must be importable (the usual ``if __name__ == "__main__"`` rule).
    Output bytes do not depend on ``workers``. Existing files are overwritten; the
    attribute CSVs are written after all clips.
    """
    _validate(spec)
    return write_corpus(spec, out, list(_plan(spec)), _render, workers, progress, chunksize=16)


def write_corpus(spec, out: str, clips: list, render, workers: int, progress: bool, chunksize: int) -> CorpusInfo:
    """Render ``clips`` with ``render((spec, out, clip)) -> relpath`` (in a spawned pool when
    ``workers > 1``), then write the attribute CSVs; the body of every generator's ``make_corpus``."""
    jobs = ((spec, out, c) for c in clips)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for _ in _progress(pool.map(render, jobs, chunksize=chunksize), len(clips), progress):
                pass
    else:
        for _ in _progress(map(render, jobs), len(clips), progress):
            pass

    counts: dict[str, dict[str, int]] = {}
    for machine in spec.machine_types:
        mine = [c for c in clips if c.machine.name == machine.name]
        counts[machine.name] = {s: sum(c.split == s for c in mine) for s in SPLITS}
        if not machine.attributes:
            continue
        for section in spec.sections:
            rows = [c for c in mine if c.section == section]
            uri = storage.join(out, machine.name, f"attributes_{section}.csv")
            storage.atomic_write_text(uri, _attributes_csv(rows))
    return CorpusInfo(root=out, n_clips=len(clips), counts=counts, files=[c.relpath for c in clips])
