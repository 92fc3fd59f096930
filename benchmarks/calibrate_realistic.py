"""Calibration record of the realistic corpus presets (:mod:`asd.data.realistic`).

Difficulty is calibrated ONLY against the two baselines, the log-mel statistics kNN and the
official DCASE autoencoder (``ae_mse``, ``ae_mahalanobis``), never against a learned encoder.

    python -m benchmarks.calibrate_realistic                 # the record: both sizes, jobs.evaluate
    python -m benchmarks.calibrate_realistic --small-seeds 0 1 2 --full-seeds 0
    python -m benchmarks.calibrate_realistic --quick --preset realistic_small --seed 0 \\
        --set anomaly_strength=1.5                             # fast in-process log-mel kNN proxy

The record goes to ``benchmarks/results/calibration_realistic.{json,txt,md}``: per size and
seed the official score of each baseline and per type AUC-source, AUC-target, pAUC and score,
with the preset's spec and its sha256 (:func:`asd.data.realistic.spec_sha256`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from asd.data import machines as M
from asd.data import realistic as R
from asd.data.dcase import DOMAINS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
METHODS = ["ae_mse", "ae_mahalanobis", "logmel"]  # the two baselines: the autoencoder's scores and the logmel recipe


# ----------------------------------------------------------------------------- quick proxy


def _embed(path: str) -> np.ndarray:
    import soundfile as sf
    import torch
    import torchaudio.compliance.kaldi as kaldi

    wave, _ = sf.read(path, dtype="float32")
    fb = kaldi.fbank(torch.from_numpy(wave)[None] * 32768.0, num_mel_bins=128, frame_length=25.0,
                     frame_shift=10.0, sample_frequency=16000, dither=0.0, htk_compat=True,
                     window_type="hanning", use_energy=False)
    e = torch.cat([fb.mean(0), fb.std(0)]).numpy()
    return e / np.linalg.norm(e)


def quick(spec: R.RealisticSpec, root: str, workers: int = 2) -> dict:
    """Generate ``spec`` at ``root`` (unless there already) and score the log-mel kNN proxy."""
    import torch
    from sklearn.metrics import roc_auc_score

    from asd.reports.metrics import evaluate

    torch.set_num_threads(1)
    t0 = time.time()
    if not os.path.exists(os.path.join(root, "_done")):
        R.make_corpus(spec, root, workers=workers, progress=False)
        Path(root, "_done").write_text("ok")
    gen_s = time.time() - t0
    clips = list(R._plan(spec))
    emb = {c.relpath: _embed(os.path.join(root, c.relpath)) for c in clips}
    rows = []
    for m in spec.machine_types:
        mine = [c for c in clips if c.machine.name == m.name]
        train = [c for c in mine if c.split == "train"]
        src = np.stack([emb[c.relpath] for c in train if c.domain == "source"])
        tgt = np.stack([emb[c.relpath] for c in train if c.domain == "target"])
        for c in (c for c in mine if c.split == "test"):
            e = emb[c.relpath]
            score = min(1 - (src @ e).max(), 1 - (tgt @ e).max())
            rows.append((m.name, c.section, c.domain, c.label, float(score), R.anomaly_kind_of(spec, c)))
    res = evaluate([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                   [r[3] for r in rows], [r[4] for r in rows])
    kinds = {}
    for m in spec.machine_types:
        for kind in M.ANOMALY_KINDS[m.kind]:
            for dom in DOMAINS:
                sel = [r for r in rows if r[0] == m.name and r[2] == dom and (r[3] == "normal" or r[5] == kind)]
                y = [r[3] == "anomaly" for r in sel]
                if 0 < sum(y) < len(y):
                    kinds[f"{m.name}/{kind}/{dom}"] = round(roc_auc_score(y, [r[4] for r in sel]), 3)
    per_type = {s.machine_type: {"auc_s": round(s.auc_source, 3), "auc_t": round(s.auc_target, 3),
                                 "pauc": round(s.pauc, 3)} for s in res.sections}
    means = {f"{d}/{lab}": round(float(np.mean([r[4] for r in rows if r[2] == d and r[3] == lab])), 4)
             for d in DOMAINS for lab in ("normal", "anomaly")}
    return {"official": round(res.official_score, 4), "means": means, "per_type": per_type, "per_kind": kinds,
            "generate_s": round(gen_s, 1)}


# ----------------------------------------------------------------------------- jobs.evaluate


def _generate(preset: str, seed: int, out: str) -> float:
    t0 = time.time()
    cmd = [sys.executable, "-m", "jobs.make_corpus", f"data={preset}", f"out={out}", f"data.spec.seed={seed}",
           "log_level=WARNING"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t0


def _evaluate(corpus: str, root: str, methods: list[str]) -> dict:
    cmd = [sys.executable, "-m", "jobs.evaluate", f"input={corpus}", f"root={root}",
           "baselines=[" + ",".join(m for m in methods if m.startswith("ae_")) + "]",
           "recipes=[" + ",".join(m for m in methods if not m.startswith("ae_")) + "]", "plots=false", "ray.num_cpus=2", "ray.progress=false",
           "log_level=WARNING"]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(Path(root, "evaluate", "report.json").read_text())
    return {"report": report, "evaluate_s": round(time.time() - t0, 1)}


def _summarise(report: dict) -> dict:
    """{method: {"official": x, "per_type": {type: {auc_s, auc_t, pauc, score}}}} from report.json."""
    out = {}
    for method, r in report["methods"].items():
        metrics = r.get("metrics") or {}
        if r.get("official_score") is None:
            out[method] = {"official": None, "error": str(r.get("error", "no score"))}
            continue
        per_type = {}
        for s in metrics.get("sections", []):
            per_type[s["machine_type"]] = {
                "auc_s": s.get("auc_source"), "auc_t": s.get("auc_target"), "pauc": s.get("pauc"),
                "score": metrics.get("per_type", {}).get(s["machine_type"]),
            }
        out[method] = {"official": r["official_score"], "per_type": per_type}
    return out


def record(small_seeds, full_seeds, workdir: str, methods=METHODS) -> dict:
    runs = []
    for preset, seeds in (("realistic_small", small_seeds), ("realistic", full_seeds)):
        for seed in seeds:
            corpus = os.path.join(workdir, f"{preset}_s{seed}", "corpus")
            gen_s = _generate(preset, seed, corpus)
            ev = _evaluate(corpus, os.path.join(workdir, f"{preset}_s{seed}", "run"), methods)
            run = {"preset": preset, "seed": seed, "generate_s": round(gen_s, 1),
                   "evaluate_s": ev["evaluate_s"], "methods": _summarise(ev["report"])}
            runs.append(run)
            print(json.dumps({k: run[k] for k in ("preset", "seed", "generate_s", "evaluate_s")}
                             | {m: v.get("official") for m, v in run["methods"].items()}), flush=True)
    specs = {p: {"sha256": R.spec_sha256(R.preset_spec(p)), "frozen_sha256": R.FROZEN_SHA256[p],
                 "spec": R.spec_dict(R.preset_spec(p))} for p in R.PRESETS}
    return {"methods": methods, "runs": runs, "presets": specs}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def write_record(rec: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration_realistic.json").write_text(json.dumps(rec, indent=1) + "\n")
    parts = []
    for preset in R.PRESETS:
        runs = [r for r in rec["runs"] if r["preset"] == preset]
        if not runs:
            continue
        for m in rec["methods"]:
            vals = [r["methods"].get(m, {}).get("official") for r in runs]
            vals = [v for v in vals if v is not None]
            if vals:
                parts.append(f"{preset} {m} {np.mean(vals):.3f} (seeds {','.join(str(r['seed']) for r in runs)}: "
                             + "/".join(f"{v:.3f}" for v in vals) + ")")
    sha = ", ".join(f"{p} {v['sha256'][:12]}" for p, v in rec["presets"].items())
    (RESULTS / "calibration_realistic.txt").write_text("; ".join(parts) + f"; spec sha256 {sha}\n")
    lines = ["# Calibration of the realistic corpus presets", "",
             "Official DCASE score (hmean of AUC-source, AUC-target, pAUC(0.1)) of the two baselines "
             "only; written by `python -m benchmarks.calibrate_realistic`.", ""]
    for p, v in rec["presets"].items():
        lines.append(f"- `{p}` spec sha256 `{v['sha256']}` (frozen: `{v['frozen_sha256']}`)")
    lines.append("")
    for r in rec["runs"]:
        lines += [f"## {r['preset']}, seed {r['seed']} (generate {r['generate_s']} s, evaluate {r['evaluate_s']} s)", ""]
        head = "| type | " + " | ".join(f"{m} AUC-s | AUC-t | pAUC | score" for m in rec["methods"]) + " |"
        lines += [head, "|" + "---|" * (1 + 4 * len(rec["methods"]))]
        types = sorted({t for m in r["methods"].values() for t in m.get("per_type", {})})
        for t in types:
            cells = []
            for m in rec["methods"]:
                pt = r["methods"].get(m, {}).get("per_type", {}).get(t, {})
                cells += [_fmt(pt.get("auc_s")), _fmt(pt.get("auc_t")), _fmt(pt.get("pauc")), _fmt(pt.get("score"))]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("| **official** | " + " | ".join(
            f"| | | **{_fmt(r['methods'].get(m, {}).get('official'))}**" for m in rec["methods"]) + " |")
        lines.append("")
    (RESULTS / "calibration_realistic.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="in-process log-mel kNN proxy on one corpus")
    ap.add_argument("--preset", default="realistic_small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="scalar spec overrides key=value (quick only)")
    ap.add_argument("--small-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--full-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--workdir", default=None, help="where corpora and runs go (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.quick:
        over = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
        spec = R.preset_spec(args.preset, seed=args.seed, **{k: v for k, v in over.items() if "." not in k})
        for key, v in over.items():  # backgrounds.<domain>.<field>=value, tuning only
            if key.startswith("backgrounds."):
                _, dom, fld = key.split(".")
                setattr(spec.backgrounds[dom], fld, tuple(v) if isinstance(v, list) else v)
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(quick(spec, args.workdir or tmp), indent=None))
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="calib_realistic_")
    rec = record(args.small_seeds, args.full_seeds, workdir, args.methods)
    write_record(rec)
    print((RESULTS / "calibration_realistic.txt").read_text().strip())


if __name__ == "__main__":
    main()
