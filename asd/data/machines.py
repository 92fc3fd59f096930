"""The sound models of the realistic generated corpus (:mod:`asd.data.realistic`): six machine types
(:func:`realistic_machines`), each a plausible machine sound with subtle attributes and
machine-specific anomalies (:data:`ANOMALY_KINDS`), in a factory background per domain
(:class:`BackgroundSpec`); :func:`synth_clip` renders one clip."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from asd.data.dcase import DOMAINS
from asd.data.synthetic import (
    _crc,
    _pulses,
    _slow_noise,
)

__all__ = ["ANOMALY_KINDS", "KINDS", "BackgroundSpec", "RealMachine", "realistic_machines", "synth_clip"]

KINDS = ("fan", "gearbox", "bearing", "pump", "slider", "valve")
ANOMALY_KINDS: dict[str, tuple[str, ...]] = {
    "fan": ("imbalance", "blade"),
    "gearbox": ("crack", "imbalance"),
    "bearing": ("outer_race", "inner_race"),
    "pump": ("cavitation", "imbalance"),
    "slider": ("rail_damage", "stick_slip"),
    "valve": ("timing", "leak"),
}


# dry-signal effect of each anomaly at gain 1 is about 0.25-0.35 of the machine RMS
_ANOMALY_GAINS = {
    "fan/imbalance": 10.0, "fan/blade": 3.0, "gearbox/crack": 10.0, "gearbox/imbalance": 10.0,
    "bearing/outer_race": 20.0, "bearing/inner_race": 25.0, "pump/cavitation": 6.0,
    "pump/imbalance": 4.0, "slider/rail_damage": 4.5, "slider/stick_slip": 30.0,
    "valve/timing": 2.0, "valve/leak": 1.5,
}


@dataclass
class RealMachine:
    """One machine type: its sound model ``kind`` and attribute values per domain.

    ``source`` / ``target`` map attribute name -> values (insertion order = file-name order).
    With ``attributes=False`` the values still drive the sound but names say ``noAttribute``.
    """

    name: str
    kind: str
    attributes: bool = True
    source: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)

    def attribute_values(self, domain: str) -> dict:
        return self.source if domain == "source" else self.target


@dataclass
class BackgroundSpec:
    """Factory background of one domain; ``(lo, hi)`` pairs are uniform per-clip ranges."""

    snr_db: tuple = (-6.0, 6.0)  # machine RMS over background RMS
    hum_count: tuple = (1, 4)  # other machines' hum stacks (inclusive range)
    hum_f0: tuple = (40.0, 300.0)  # Hz, log-uniform
    hum_level_db: tuple = (-12.0, 6.0)  # each stack, relative to the hiss
    hiss_slope: tuple = (0.3, 1.8)  # 1/f^beta power spectrum
    hiss_bumps_db: float = 5.0  # std of a smooth random EQ of the hiss
    impact_rate: float = 1.0  # events per second (Poisson)
    impact_level_db: tuple = (-6.0, 10.0)  # event peak vs background RMS
    level_var_db: float = 3.0  # std of the slow level change within a clip
    reverb_rt60: tuple = (0.05, 0.5)  # s, smearing of the machine
    reverb_wet: tuple = (0.1, 0.6)  # reverberant share of the machine
    gain_db: tuple = (-30.0, -24.0)  # clip RMS, dBFS


def realistic_machines() -> list[RealMachine]:
    return [
        RealMachine("fan", "fan", True,
                    {"speed": (1420, 1440, 1460), "mic": (1, 2)},
                    {"speed": (1485,), "mic": (1, 2)}),
        RealMachine("gearbox", "gearbox", True,
                    {"speed": (1200, 1220, 1240), "load": (30, 70)},
                    {"speed": (1265,), "load": (50,)}),
        RealMachine("bearing", "bearing", False,
                    {"speed": (1450, 1500, 1550), "load": (20, 60)},
                    {"speed": (1620,), "load": (40,)}),
        RealMachine("pump", "pump", True,
                    {"flow": (60, 80, 100), "mic": (1, 2)},
                    {"flow": (70,), "mic": (3,)}),
        RealMachine("slider", "slider", False,
                    {"velocity": (80, 90, 100), "cycle": (900, 1000)},
                    {"velocity": (110,), "cycle": (950,)}),
        RealMachine("valve", "valve", True,
                    {"cycle": (480, 500, 520), "mic": (1, 2)},
                    {"cycle": (550,), "mic": (1, 2)}),
    ]


def _source_bg() -> BackgroundSpec:
    return BackgroundSpec()


def _target_bg() -> BackgroundSpec:
    # another site: one hall (narrower condition range than the many source sessions),
    # higher hum, whiter hiss, more impacts, more reverb
    return BackgroundSpec(snr_db=(-2.0, 2.0), hum_count=(1, 3), hum_f0=(150.0, 500.0),
                          hiss_slope=(0.2, 0.8), hiss_bumps_db=3.0, impact_rate=1.5,
                          level_var_db=2.0, reverb_rt60=(0.25, 0.5), reverb_wet=(0.3, 0.6),
                          gain_db=(-29.0, -25.0))


# ----------------------------------------------------------------------------- building blocks


def _fixed_rng(*keys) -> np.random.Generator:
    """RNG of a fixed per-type property (timbre, transfer function), not per clip."""
    return np.random.default_rng([_crc(str(k)) for k in keys])


def _stack(phase: np.ndarray, mults, amps, rng: np.random.Generator) -> np.ndarray:
    """sum_i amps[i] * sin(mults[i] * phase + random offset)."""
    out = np.zeros_like(phase)
    for m, a in zip(mults, amps):
        if a != 0.0:
            out += a * np.sin(m * phase + rng.uniform(0, 2 * np.pi))
    return out


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x)) + 1e-12)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / _rms(x)


def _smooth_eq(rng: np.random.Generator, f: np.ndarray, std_db: float, n_knots: int = 12) -> np.ndarray:
    """A smooth random gain curve over log frequency (std ``std_db``), linear gain."""
    knots = rng.standard_normal(n_knots) * std_db
    pos = np.log2(np.maximum(f, 50.0) / 50.0) / np.log2(8000.0 / 50.0) * (n_knots - 1)
    return 10 ** (np.interp(pos, np.arange(n_knots), knots) / 20.0)


def _shape(x: np.ndarray, gain: np.ndarray) -> np.ndarray:
    return np.fft.irfft(np.fft.rfft(x) * gain, len(x))


def _band(f: np.ndarray, lo: float, hi: float, order: float = 2.0) -> np.ndarray:
    """Smooth band-pass magnitude response."""
    f = np.maximum(f, 1.0)
    return 1.0 / np.sqrt((1 + (lo / f) ** (2 * order)) * (1 + (f / hi) ** (2 * order)))


def _resonance_kernel(sr: int, freq: float, decay_s: float, length_s: float = 0.02) -> np.ndarray:
    kt = np.arange(int(length_s * sr)) / sr
    return np.exp(-kt / decay_s) * np.sin(2 * np.pi * freq * kt)


def _impulse_train(n: int, sr: int, rate: float, jitter: float, rng, kernel, amp_mod=None) -> np.ndarray:
    """Kernels at ``rate`` Hz with relative timing jitter; ``amp_mod(t_s)`` scales each one."""
    period = sr / rate
    pos = np.arange(rng.uniform(0, period), n, period)
    pos = pos + rng.normal(0, jitter * period, len(pos))
    pos = np.clip(pos, 0, n - 1).astype(int)
    amps = rng.uniform(0.7, 1.0, len(pos))
    if amp_mod is not None:
        amps = amps * amp_mod(pos / sr)
    return _pulses(n, pos, amps, kernel)


def _shaft(rng, rpm: float, n: int, sr: int, dur: float, wander: float = 0.0015):
    """Shaft rate (Hz, per sample) with per-clip offset and slow wander, and its phase."""
    fs = rpm / 60.0 * (1.0 + 0.004 * rng.standard_normal())
    f = fs * (1.0 + wander * _slow_noise(rng, n, 3.0, dur))
    return fs, np.cumsum(f) * (2 * np.pi / sr)


def _pattern(name: str, tag: str, n: int, lo: float = 0.3, hi: float = 1.0) -> np.ndarray:
    return _fixed_rng(name, tag).uniform(lo, hi, n)


def _jitter_db(rng, n: int, std_db: float) -> np.ndarray:
    return 10 ** (rng.normal(0, std_db, n) / 20.0)


# ----------------------------------------------------------------------------- machines
# Each returns the machine's own dry signal (any scale); ``an`` is None or (kind, strength, rng).


def _fan(m, a, rng, an, n, sr, dur, f):
    fs, ph = _shaft(rng, float(a["speed"]), n, sr, dur)
    blades = 7
    k = np.arange(1, 11)
    amps = _pattern(m.name, "bpf", 10, 0.4, 1.0) * k ** -1.0 * _jitter_db(rng, 10, 1.5)
    tone = _stack(ph, blades * k, amps, rng)
    shaft_amps = 0.04 * _jitter_db(rng, 3, 3.0) * np.array([1.0, 0.5, 0.3])
    am_depth = 0.0
    if an and an[0] == "blade":  # one weak blade: once-per-revolution dip of the blade pulses
        d = min(0.9, 0.25 * an[1])
        blade_pos = an[2].uniform(0, 2 * np.pi)
        dip = np.exp(-0.5 * (np.angle(np.exp(1j * (ph - blade_pos))) / (np.pi / blades)) ** 2)
        tone = tone * (1.0 - d * dip)
    if an and an[0] == "imbalance":
        shaft_amps = shaft_amps + np.array([0.12, 0.03, 0.0]) * an[1]
        am_depth = min(0.5, 0.05 * an[1])
    tone = tone + _stack(ph, [1, 2, 3], shaft_amps * _rms(tone) / 0.1, rng) * 0.1
    turb = 1.0 + 0.08 * _slow_noise(rng, n, 6.0, dur)
    air = _shape(rng.standard_normal(n), _band(f, 250.0, 4500.0) * _smooth_eq(rng, f, 1.0))
    air *= 0.6 * (float(a["speed"]) / 1440.0) ** 2.5 * _rms(tone) / _rms(air) * 10 ** (rng.normal(0, 1.0) / 20)
    x = tone * turb + air
    if am_depth:
        x = x * (1.0 + am_depth * np.sin(ph + an[2].uniform(0, 2 * np.pi)))
    return x


def _gearbox(m, a, rng, an, n, sr, dur, f):
    teeth = 29
    fs, ph = _shaft(rng, float(a["speed"]), n, sr, dur)
    load = float(a["load"]) / 100.0
    k = np.arange(1, 7)
    base = _pattern(m.name, "gmf", 6, 0.4, 1.0) * k ** -0.8
    load_pat = _pattern(m.name, "load", 6, -1.0, 1.0)
    amps = base * (1.0 + 0.3 * (load - 0.5) * load_pat) * _jitter_db(rng, 6, 1.5)
    mesh = _stack(ph, teeth * k, amps, rng)
    ecc = 0.03 + 0.04 * load
    mod = 1.0 + ecc * np.sin(ph + rng.uniform(0, 2 * np.pi))
    extra = np.zeros(n)
    if an and an[0] == "crack":  # cracked tooth: per-revolution mesh dip and impact
        s, r = an[1], an[2]
        pos = r.uniform(0, 2 * np.pi)
        dip = np.exp(-0.5 * (np.angle(np.exp(1j * (ph - pos))) / (2 * np.pi / teeth)) ** 2)
        mod = mod * (1.0 - min(0.9, 0.35 * s) * dip)
        kern = _resonance_kernel(sr, r.uniform(2500, 4000), 0.0015)
        extra = 0.25 * s * _rms(mesh) * _impulse_train(n, sr, fs, 0.003, r, kern) / max(1e-9, kern.std() * 3)
    if an and an[0] == "imbalance":
        mod = mod * (1.0 + min(0.5, 0.05 * an[1]) * np.sin(ph + an[2].uniform(0, 2 * np.pi)))
        extra = 0.08 * an[1] * _rms(mesh) * np.sin(ph)
    out_ph = ph * teeth / 37.0
    shafts = _stack(out_ph, [1, 2], [0.05, 0.03], rng) * _rms(mesh) / 0.05
    rumble = _shape(rng.standard_normal(n), _band(f, 100.0, 3000.0) * _smooth_eq(rng, f, 1.0))
    rumble *= (0.3 + 0.3 * load) * _rms(mesh) / _rms(rumble)
    return mesh * mod + 0.1 * shafts + rumble + extra


def _bearing(m, a, rng, an, n, sr, dur, f):
    fs, ph = _shaft(rng, float(a["speed"]), n, sr, dur)
    load = float(a["load"]) / 100.0
    res = _fixed_rng(m.name, "res").uniform(2600, 3400)
    shaft = _stack(ph, [1, 2, 3, 4, 5], _pattern(m.name, "sh", 5, 0.2, 1.0) * _jitter_db(rng, 5, 2.0), rng)
    q = 6.0
    reso = 1.0 / np.sqrt(1 + (q * (f / res - res / np.maximum(f, 1.0))) ** 2)
    noise_gain = (0.4 * _band(f, 80.0, 1500.0) + (0.5 + load) * reso) * _smooth_eq(rng, f, 1.0)
    rolling = _shape(rng.standard_normal(n), noise_gain)
    cage = 1.0 + 0.05 * np.sin(0.4 * ph)
    rolling = rolling * cage * _rms(shaft) / _rms(rolling) * (0.8 + 0.6 * load)
    x = shaft + rolling
    if an:
        kind, s, r = an
        kern = _resonance_kernel(sr, res * r.uniform(0.95, 1.05), 0.0008)
        kern /= kern.std() * 8
        if kind == "outer_race":
            imp = _impulse_train(n, sr, 3.58 * fs, 0.01, r, kern)
        else:
            phase0 = r.uniform(0, 2 * np.pi)
            imp = _impulse_train(n, sr, 5.42 * fs, 0.01, r, kern,
                                 amp_mod=lambda ts: 0.5 + 0.5 * np.cos(2 * np.pi * fs * ts + phase0))
        x = x + 0.3 * s * _rms(x) * imp
    return x


def _pump(m, a, rng, an, n, sr, dur, f):
    t = np.arange(n) / sr
    flow = float(a["flow"]) / 100.0
    fs, ph = _shaft(rng, 2900.0, n, sr, dur, wander=0.001)
    vanes = 5
    k = np.arange(1, 9)
    flow_pat = _pattern(m.name, "flow", 8, -1.0, 1.0)
    amps = _pattern(m.name, "vpf", 8, 0.4, 1.0) * k ** -0.9 * (1 + 0.35 * (flow - 0.8) * flow_pat)
    vpf = _stack(ph, vanes * k, amps * _jitter_db(rng, 8, 1.5), rng)
    shaft_amps = np.array([0.06, 0.03, 0.02]) * _jitter_db(rng, 3, 3.0)
    if an and an[0] == "imbalance":
        shaft_amps = shaft_amps + np.array([0.15, 0.04, 0.0]) * an[1]
    shafts = _stack(ph, [1, 2, 3], shaft_amps, rng)
    puls = 1.0 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t)
    turb = _shape(rng.standard_normal(n), _band(f, 80.0, 2500.0) * _smooth_eq(rng, f, 1.0))
    turb *= (0.4 + 0.5 * flow ** 1.5) * _rms(vpf) / _rms(turb)
    x = (vpf + shafts * _rms(vpf) / 0.3) * puls + turb
    if an and an[0] == "imbalance":
        x = x * (1.0 + min(0.5, 0.05 * an[1]) * np.sin(ph))
    if an and an[0] == "cavitation":  # bubble collapse: HF crackle in bursts
        s, r = an[1], an[2]
        n_bursts = max(1, r.poisson(3.0 * dur))
        win = np.hanning(int(r.uniform(0.03, 0.08) * sr))
        env = _pulses(n, r.integers(0, n, n_bursts), r.uniform(0.5, 1.0, n_bursts), win)
        sparse = (r.random(n) < 0.05) * r.standard_normal(n)
        crackle = _shape(sparse, _band(f, 3000.0, 7500.0))
        x = x + 0.5 * s * _rms(x) * env * crackle / _rms(crackle)
    return x


def _slider(m, a, rng, an, n, sr, dur, f):
    t = np.arange(n) / sr
    vmax = float(a["velocity"]) / 100.0  # m/s
    period = float(a["cycle"]) / 1000.0 * (1 + 0.01 * rng.standard_normal())
    phase = (t / period + rng.uniform(0, 1)) % 1.0
    # trapezoid forward (0-0.4), dwell, backward (0.5-0.9), dwell
    def trap(p):
        return np.clip(np.minimum(p, 0.4 - p) / 0.08, 0, 1)
    v = vmax * (trap(phase) - trap(phase - 0.5))
    speed = np.abs(v)
    whine_f = 180.0 * speed * (1 + 0.003 * rng.standard_normal())  # ball-screw rate
    wph = np.cumsum(whine_f) * (2 * np.pi / sr)
    k = np.arange(1, 9)
    whine = _stack(wph, k, _pattern(m.name, "wh", 8, 0.3, 1.0) * k ** -0.7 * _jitter_db(rng, 8, 1.5), rng)
    whine *= speed / vmax
    pwm = 0.05 * np.sin(2 * np.pi * 4000.0 * t + rng.uniform(0, 6.3))
    fric = _shape(rng.standard_normal(n), _band(f, 500.0, 6000.0) * _smooth_eq(rng, f, 1.0))
    fric *= speed / vmax * 0.5 * _rms(whine) / _rms(fric)
    rev = np.flatnonzero(np.diff((speed > 1e-3).astype(int)) != 0)
    kern = _resonance_kernel(sr, _fixed_rng(m.name, "clunk").uniform(400, 900), 0.01, 0.05)
    clunk = _pulses(n, rev, rng.uniform(0.2, 0.4, len(rev)), kern) * _rms(whine) * 3
    x = whine + pwm * _rms(whine) / 0.1 + fric + clunk
    if an:
        kind, s, r = an
        if kind == "rail_damage":  # damage every `spacing` m: clicks at rate v / spacing
            spacing = r.uniform(0.006, 0.012)
            pos = np.cumsum(speed) / sr
            hits = np.flatnonzero(np.diff(np.floor(pos / spacing)) > 0)
            kern = _resonance_kernel(sr, r.uniform(2000, 4500), 0.001)
            clicks = _pulses(n, hits, r.uniform(0.6, 1.0, len(hits)), kern)
            x = x + 0.25 * s * _rms(x) * clicks / max(1e-9, _rms(clicks)) * np.sqrt(len(hits) / (n / sr) / 300 + 1e-9)
        else:  # stick-slip squeal bursts during motion
            fsq = r.uniform(1500, 3000)
            n_b = max(1, r.poisson(1.5 * dur))
            win = np.hanning(int(0.08 * sr))
            env = _pulses(n, r.integers(0, n, n_b), r.uniform(0.5, 1.0, n_b), win) * (speed / vmax)
            sq = np.sin(2 * np.pi * fsq * t + 0.3 * np.sin(2 * np.pi * 30 * t))
            x = x + 0.3 * s * _rms(x) * env * sq
    return x


def _valve(m, a, rng, an, n, sr, dur, f):
    t = np.arange(n) / sr
    period = float(a["cycle"]) / 1000.0 * (1 + 0.005 * rng.standard_normal())
    duty = 0.4
    t0 = rng.uniform(-period, 0)
    opens = t0 + period * np.arange(int(dur / period) + 3)
    opens = opens + rng.normal(0, 0.002, len(opens))
    closes = opens + duty * period + rng.normal(0, 0.002, len(opens))
    if an and an[0] == "timing":  # late / early closing in some cycles, a bounce
        s, r = an[1], an[2]
        hit = r.random(len(closes)) < 0.6
        closes = closes + hit * s * r.choice([-1, 1]) * r.uniform(0.03, 0.06, len(closes)) * period
    fr = _fixed_rng(m.name, "click")
    k_open = _resonance_kernel(sr, fr.uniform(1500, 2200), 0.003, 0.03)
    k_close = _resonance_kernel(sr, fr.uniform(3000, 4000), 0.002, 0.03)
    def at(times):
        idx = (times * sr).astype(int)
        return idx[(idx >= 0) & (idx < n)]
    po, pc = at(opens), at(closes)
    clicks = _pulses(n, po, rng.uniform(0.8, 1.0, len(po)), k_open) + \
        _pulses(n, pc, rng.uniform(0.8, 1.0, len(pc)), k_close) * 0.8
    state = np.zeros(n)
    for o, c in zip(opens, closes):
        i0, i1 = int(max(0, o * sr)), int(min(n, c * sr))
        if i1 > i0:
            state[i0:i1] = 1.0
    ramp = np.hanning(int(0.01 * sr))
    env = np.convolve(state, ramp / ramp.sum(), mode="same")
    hiss = _shape(rng.standard_normal(n), _band(f, 800.0, 6000.0) * _smooth_eq(rng, f, 1.0))
    hiss = hiss / _rms(hiss)
    hum = (0.3 * np.sin(2 * np.pi * 100 * t) + 0.1 * np.sin(2 * np.pi * 200 * t)) * env
    x = clicks / _rms(clicks) + 0.4 * env * hiss + 0.2 * hum
    if an and an[0] == "leak":
        s, r = an[1], an[2]
        whistle = np.sin(2 * np.pi * r.uniform(2500, 5000) * t) * (1 + 0.2 * _slow_noise(r, n, 5, dur))
        x = x + s * (1 - env) * (0.08 * hiss + 0.05 * whistle)
    return x


_MACHINES = {"fan": _fan, "gearbox": _gearbox, "bearing": _bearing, "pump": _pump,
             "slider": _slider, "valve": _valve}


# ----------------------------------------------------------------------------- background


def _background(bg: BackgroundSpec, rng, n: int, sr: int, dur: float, f: np.ndarray) -> np.ndarray:
    beta = rng.uniform(*bg.hiss_slope)
    gain = np.maximum(f, 30.0) ** (-beta / 2) * _smooth_eq(rng, f, bg.hiss_bumps_db)
    hiss = _unit(_shape(rng.standard_normal(n), gain))
    x = hiss.copy()
    for _ in range(rng.integers(bg.hum_count[0], bg.hum_count[1] + 1)):
        f0 = np.exp(rng.uniform(np.log(bg.hum_f0[0]), np.log(bg.hum_f0[1])))
        freq = f0 * (1 + 0.002 * _slow_noise(rng, n, 1.0, dur))
        ph = np.cumsum(freq) * (2 * np.pi / sr)
        nh = int(rng.integers(3, 9))
        k = np.arange(1, nh + 1)
        amps = k ** -rng.uniform(0.3, 1.5) * _jitter_db(rng, nh, 4.0)
        amps[k * f0 > 0.45 * sr] = 0.0
        hum = _unit(_stack(ph, k, amps, rng)) * (1 + 0.3 * _slow_noise(rng, n, 0.7, dur))
        x += hum * 10 ** (rng.uniform(*bg.hum_level_db) / 20)
    x = _unit(x)
    n_imp = rng.poisson(bg.impact_rate * dur)
    for _ in range(n_imp):
        length = int(rng.uniform(0.01, 0.15) * sr)
        burst = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 4))
        fr = np.fft.rfftfreq(length, 1 / sr)
        burst = _shape(burst, _band(fr, rng.uniform(100, 1500), rng.uniform(2000, 7500)))
        burst = burst / (np.max(np.abs(burst)) + 1e-12) * 10 ** (rng.uniform(*bg.impact_level_db) / 20)
        i0 = int(rng.integers(0, n))
        seg = burst[: n - i0]
        x[i0:i0 + len(seg)] += seg
    level = 10 ** (bg.level_var_db * _slow_noise(rng, n, 0.5, dur) / 20)
    return x * level


def _reverb(x: np.ndarray, rng, sr: int, bg: BackgroundSpec) -> np.ndarray:
    rt60 = rng.uniform(*bg.reverb_rt60)
    wet = rng.uniform(*bg.reverb_wet)
    length = int(min(rt60, 1.0) * sr)
    ir = rng.standard_normal(length) * np.exp(-6.9 * np.arange(length) / (rt60 * sr))
    nfft = 1 << int(np.ceil(np.log2(len(x) + length)))
    rev = np.fft.irfft(np.fft.rfft(x, nfft) * np.fft.rfft(ir, nfft), nfft)[: len(x)]
    return (1 - wet) * _unit(x) + wet * _unit(rev)


# ----------------------------------------------------------------------------- one clip


def synth_clip(machine: RealMachine, attrs: dict, domain: str, anomaly: str | None,
               rng: np.random.Generator, duration_s: float, sample_rate: int, strength: float,
               backgrounds: dict | None = None) -> np.ndarray:
    """One clip: float32 mono in [-1, 1].

    The machine, the anomaly and the background each get their own child RNG drawn first
    from ``rng``, so a clip with ``anomaly`` differs from the same clip without it only by
    the anomaly (and the mix's normalisation).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    kinds = ANOMALY_KINDS[machine.kind]
    if anomaly is not None and anomaly not in kinds:
        raise ValueError(f"{machine.kind}: anomaly must be None or one of {kinds}, got {anomaly!r}")
    bg = (backgrounds or {"source": _source_bg(), "target": _target_bg()})[domain]
    if isinstance(bg, dict):
        bg = BackgroundSpec(**bg)
    seeds = rng.integers(0, 2**63, 4)
    r_machine, r_anom, r_bg, r_mix = (np.random.default_rng(int(s)) for s in seeds)
    sr = sample_rate
    n = int(round(duration_s * sr))
    f = np.fft.rfftfreq(n, 1 / sr)
    an = (anomaly, float(strength), r_anom) if anomaly is not None else None
    x = _MACHINES[machine.kind](machine, attrs, r_machine, an, n, sr, duration_s, f)
    # mic position: a fixed smooth transfer function per (type, mic); plus per-clip jitter
    mic = attrs.get("mic", 0)
    tf = _smooth_eq(_fixed_rng(machine.name, "mic", mic), f, 2.0) * _smooth_eq(r_mix, f, 0.7)
    x = _reverb(_shape(x, tf), r_mix, sr, bg)
    back = _unit(_background(bg, r_bg, n, sr, duration_s, f))
    snr = r_mix.uniform(*bg.snr_db)
    y = _unit(x) * 10 ** (snr / 20) + back
    y = y / _rms(y) * 10 ** (r_mix.uniform(*bg.gain_db) / 20)
    peak = np.max(np.abs(y))
    if peak > 0.99:
        y *= 0.99 / peak
    return y.astype(np.float32)
