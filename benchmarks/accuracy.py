"""Accuracy record of the served recipe against the baselines, in one command.

    python -m benchmarks.accuracy                        # every part (about 2.5 h on 2 cores)
    python -m benchmarks.accuracy --parts real small     # some parts
    python -m benchmarks.accuracy --parts pipeline       # the main command as a user runs it

Parts (each runs the jobs in fresh processes, corpora and run roots under ``--work``):

* ``calibration``: ``benchmarks.calibrate_realistic`` (the two baselines only, both presets);
* ``ablation``: the paper's ablation on the full ``realistic`` preset, seed 0, one
  ``jobs.evaluate`` run -> ``results/ablation_realistic.{md,json,png}``;
* ``seeds``: AE-MSE, log-mel kNN, the served recipe (``fused``) and the other learned
  recipes (``cnn``, ``mod``) on the full preset,
  seeds 0/1/2 -> ``results/seeds_realistic.{json,txt,png}``;
* ``small``: both baselines and the served recipe on ``realistic_small`` (the main command's
  corpus), seeds 0/1/2 -> ``results/served_realistic_small.{json,txt,png}``;
* ``real``: the per-corpus table: the complete real DCASE 2023 ToyCar development set (built from
  its kit into ``$ASD_REAL_DATA/dcase2023_toycar_dev``; skipped when absent), the real DCASE 2024
  RoboticArm clips and the generated full ``realistic`` preset, the autoencoder, log-mel kNN and
  the served recipe in one ``jobs.evaluate`` run per seed (``--seeds``) ->
  ``results/real_corpora.{json,txt}``;
* ``pipeline``: ``python -m jobs.pipeline`` with no arguments -> ``results/accuracy_pipeline.*``.

Every part writes JSON plus a line of text; the summary goes to ``results/accuracy.{json,txt}``
(parts not rerun keep their last record there, dated).
The served recipe is fixed by ``jobs/conf/served.yaml``; nothing here picks a setting from test labels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asd.reports import tables  # noqa: E402
from benchmarks._common import RESULTS, run_child, write_result  # noqa: E402


def served_recipe() -> str:
    """The served recipe's name (``jobs/conf/served.yaml``)."""
    from omegaconf import OmegaConf

    choice = OmegaConf.load(REPO / "jobs" / "conf" / "served.yaml").defaults[0]["recipe"]
    return str(OmegaConf.load(REPO / "jobs" / "conf" / "recipe" / f"{choice}.yaml").name)


SERVED = served_recipe()
AE = ("ae_mse", "ae_mahalanobis")  # jobs.evaluate's baselines
BASELINES = (*AE, "logmel")  # a margin is measured against the best of these
ABLATION = [*AE, "logmel", "pretrained", "finetuned_ssl", "cnn_section", "cnn", "cnn_real", "mod",
            "fused"]  # the paper's ablation, and the served recipe (SERVED)
SEEDS = (0, 1, 2)
# the learned recipes measured beside the served one on the full-preset seeds (each CNN alone; the served
# fused is one log-mel CNN and five modulation CNNs, score-level fusion)
CANDIDATES = [m for m in ("cnn", "mod", "fused") if m != SERVED]
PARTS = ("calibration", "ablation", "seeds", "small", "real", "pipeline")


def _run(cmd: list[str], work: Path, what: str) -> dict:
    """Run a job in a fresh process; returns its final JSON line. Progress on stderr."""
    t0 = time.time()
    print(f"[accuracy] {what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    final = run_child(cmd, timeout=None, env={"ASD_HYDRA_DIR": str(work / "hydra")}, cwd=str(REPO))
    print(f"[accuracy] {what}: done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return final


def corpus(preset: str, seed: int, work: Path) -> str:
    out = work / f"{preset}-s{seed}" / "corpus"
    _run(["-m", "jobs.make_corpus", f"data={preset}", f"data.spec.seed={seed}", f"out={out}"], work,
         f"corpus {preset} seed {seed}")  # skipped by the job when already there with this spec
    return str(out)


def evaluate(input_uri: str, methods: list[str], root: Path, work: Path, name: str,
             report_to: str | None = None, extra: list[str] = ()) -> dict:
    """One ``jobs.evaluate`` run; returns its report.json."""
    cmd = ["-m", "jobs.evaluate", f"input={input_uri}", f"root={root}", *evaluate_methods(methods),
           f"name={name}", "ray.progress=false", *extra]
    if report_to:
        cmd.append(f"report_to={report_to}")
    final = _run(cmd, work, f"evaluate {name}")
    return json.loads(Path(final["report_json"]).read_text())


def training_seed(seed: int) -> list[str]:
    """``jobs.evaluate`` overrides that train every model of every recipe, and the autoencoder, with
    another seed (0: the shipped seeds)."""
    if seed == 0:
        return []
    from jobs.common import compose_config

    served = compose_config("evaluate").recipe
    keys = [f"models.{m}.train.seed={seed}" for m in served.models] + ([f"pretrain.train.seed={seed}"]
                                                                       if served.pretrain else [])
    return ["recipe_overrides=[" + ",".join(f"'{k}'" for k in keys) + "]", f"ae.seed={13711 + seed}"]


def evaluate_methods(methods: list[str]) -> list[str]:
    """``jobs.evaluate`` overrides that run ``methods``: the autoencoder's scores and recipes."""
    return ["baselines=[" + ",".join(m for m in methods if m in AE) + "]",
            "recipes=[" + ",".join(m for m in methods if m not in AE) + "]"]


def _pct(v) -> str:
    return tables.pct(v)


def _seed_table(rows: list[dict], methods: list[str]) -> dict:
    """Per seed: every method, the better baseline and the served recipe's margin over it."""
    out = []
    for r in rows:
        s = r["official_scores"]
        base = [s[m] for m in BASELINES if s.get(m) is not None]
        best = max(base) if base else None
        margin = None if best is None or s.get(SERVED) is None else s[SERVED] - best
        out.append({"seed": r["seed"], **{m: s.get(m) for m in methods}, "best_baseline": best,
                    "served_minus_best_baseline": margin})
    margins = [r["served_minus_best_baseline"] for r in out if r["served_minus_best_baseline"] is not None]
    return {"rows": out, "median": {m: statistics.median(r[m] for r in out if r[m] is not None) for m in methods
                                    if any(r[m] is not None for r in out)},
            "median_served_minus_best_baseline": statistics.median(margins) if margins else None}


def _seed_line(label: str, table: dict, methods: list[str]) -> str:
    per = "; ".join(f"{m} " + "/".join(_pct(r[m]) for r in table["rows"]) + f" (median {_pct(table['median'].get(m))})"
                    for m in methods)
    margins = "/".join("n/a" if r["served_minus_best_baseline"] is None else f"{100 * r['served_minus_best_baseline']:+.2f}"
                       for r in table["rows"])
    med = table["median_served_minus_best_baseline"]
    return (f"{label}, seeds {'/'.join(str(r['seed']) for r in table['rows'])}: {per}; served ({SERVED}) minus the "
            f"better baseline {margins} (median {'n/a' if med is None else f'{100 * med:+.2f}'} points)")


def part_calibration(work: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.calibrate_realistic"]
    print(f"[accuracy] calibration: {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
                                             ASD_HYDRA_DIR=str(work / "hydra")), cwd=str(REPO))
    line = (RESULTS / "calibration_realistic.txt").read_text().strip()
    return {"record": str(RESULTS / "calibration_realistic.json"), "line": line}


def part_ablation(work: Path) -> dict:
    src = corpus("realistic", 0, work)
    rep = evaluate(src, ABLATION, work / "ablation", work, "realistic_seed0_ablation",
                   report_to=str(RESULTS / "ablation_realistic"))
    s = rep["official_scores"]
    line = "ablation, realistic seed 0: " + "; ".join(f"{m} {_pct(s.get(m))}" for m in ABLATION)
    return {"official_scores": s, "report": str(RESULTS / "ablation_realistic.md"), "line": line}


def _seeds(preset: str, methods: list[str], work: Path, name: str, label: str) -> dict:
    rows = []
    for seed in SEEDS:
        rep = evaluate(corpus(preset, seed, work), methods, work / f"{name}-s{seed}", work, f"{preset}_seed{seed}")
        rows.append({"seed": seed, "official_scores": rep["official_scores"]})
    table = _seed_table(rows, methods)
    line = _seed_line(label, table, methods)
    write_result(name, {"preset": preset, "methods": methods, "served": SERVED, **table}, line)
    plot_seed_table(RESULTS / f"{name}.json")
    return {"line": line, **table}


def plot_seed_table(record: Path) -> Path:
    """``<record>.png``: every method's official score per seed (bars) and the better baseline (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = json.loads(Path(record).read_text())
    rows, methods = d["rows"], d["methods"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(rows), 3.6))
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(rows))]
        ys = [100 * (r[m] or 0.0) for r in rows]
        ax.bar(xs, ys, width, label=m + (" (served)" if m == d["served"] else ""),
               edgecolor="black" if m == d["served"] else None)
    for i, r in enumerate(rows):
        if r["best_baseline"] is not None:
            ax.hlines(100 * r["best_baseline"], i - 0.45, i + 0.45, colors="red", linestyles="--",
                      label="better baseline" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [f"seed {r['seed']}" for r in rows])
    ax.set_ylim(45, max(70, 5 + max(100 * (r[m] or 0) for r in rows for m in methods)))
    ax.set_ylabel("official score (%)")
    med = d.get("median_served_minus_best_baseline")
    ax.set_title(f"{d['preset']}: served minus the better baseline, median "
                 + ("n/a" if med is None else f"{100 * med:+.2f}") + " points", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    out = Path(record).with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def part_seeds(work: Path) -> dict:
    return _seeds("realistic", ["ae_mse", "logmel", SERVED, *CANDIDATES], work, "seeds_realistic",
                  "realistic (full)")


def part_small(work: Path) -> dict:
    return _seeds("realistic_small", [*BASELINES, SERVED], work, "served_realistic_small", "realistic_small")


REAL = ("toycar", "roboticarm", "realistic")  # the per-corpus table of part real


def _margin(scores: dict) -> float | None:
    base = [scores[m] for m in BASELINES if scores.get(m) is not None]
    return None if not base or scores.get(SERVED) is None else scores[SERVED] - max(base)


def _spread(values: list) -> dict:
    v = sorted(x for x in values if x is not None)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1]} if v else {"median": None}


def part_real(work: Path, seeds=SEEDS) -> dict:
    """The per-corpus table: the complete real DCASE 2023 ToyCar development set (when built), the
    real DCASE 2024 RoboticArm clips and the generated full ``realistic`` preset, each with the
    autoencoder baseline, log-mel kNN and the served recipe in one ``jobs.evaluate`` run per seed
    (ToyCar, RoboticArm: training seeds on one split; realistic: corpus seeds); ``--seeds``."""
    real = Path(os.environ.get("ASD_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
    inputs = {"toycar": real / "dcase2023_toycar_dev", "roboticarm": real / "dcase2024_roboticarm"}
    methods = [*AE, "logmel", SERVED]
    out: dict = {"seeds": list(seeds), "methods": methods, "served": SERVED, "corpora": {}}
    for name in REAL:
        if name in inputs and not any(inputs[name].glob("*/train/*.wav")):
            print(f"[accuracy] real: {inputs[name]} has no clips; {name} skipped", file=sys.stderr, flush=True)
            continue
        runs = []
        for seed in seeds:
            src = str(inputs[name]) if name in inputs else corpus("realistic", seed, work)
            rep = evaluate(src, methods, work / f"real-{name}-s{seed}", work, f"{name}_seed{seed}",
                           extra=training_seed(seed) if name in inputs else [])
            per = {m: {"official": d["official_score"], **_domain_aucs(d["metrics"])} for m, d in rep["methods"].items()}
            runs.append({"seed": seed, "official_scores": rep["official_scores"], "metrics": per,
                         "margin": _margin(rep["official_scores"]), "seconds": rep["seconds"]})
        out["corpora"][name] = {
            "runs": runs, "margin": _spread([r["margin"] for r in runs]),
            "median": {m: _spread([r["official_scores"].get(m) for r in runs])["median"] for m in methods}}
    line = "real: " + "; ".join(
        f"{name} " + ", ".join(f"{m} {_pct(c['median'][m])}" for m in methods)
        + f" (served minus the better baseline, median of {len(c['runs'])}: "
        + ("n/a" if c["margin"]["median"] is None else
           f"{100 * c['margin']['median']:+.2f}, {100 * c['margin']['min']:+.2f}..{100 * c['margin']['max']:+.2f}") + ")"
        for name, c in out["corpora"].items())
    write_result("real_corpora", out, line)
    return {"line": line, **out}


def _domain_aucs(m: dict | None) -> dict:
    """AUC-source, AUC-target and pAUC (harmonic means over sections) of a metrics.json dict."""
    if not m:
        return {}
    rows = m.get("sections") or []
    from asd.reports.metrics import harmonic_mean

    return {k: harmonic_mean([r[k] for r in rows if r.get(k) is not None]) for k in ("auc_source", "auc_target", "pauc")}


def part_pipeline(work: Path) -> dict:
    t0 = time.time()
    final = _run(["-m", "jobs.pipeline", f"root={work / 'pipeline'}", "ray.progress=false"], work, "pipeline")
    seconds = time.time() - t0
    scores = final["official_scores"]
    line = (f"python -m jobs.pipeline ({seconds / 60:.1f} min): served {final['served']['recipe']} "
            f"{_pct(final['official_score'])}; " + ", ".join(f"{n} {_pct(v)}" for n, v in scores.items()
                                                          if n != final["served"]["recipe"]))
    write_result("accuracy_pipeline", {"official_scores": scores, "served": final["served"]["recipe"],
                                       "seconds": round(seconds, 1)}, line)
    return {"line": line, "official_scores": scores, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--work", default=None, help="corpora and run roots (default: a new temp folder)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                   help="part real: training seeds (ToyCar, RoboticArm) and corpus seeds (realistic); one seed "
                        "takes about an hour on 2 cores, three about three hours")
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="asd-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[accuracy] corpora and runs under {work}", file=sys.stderr, flush=True)
    summary = RESULTS / "accuracy.json"  # parts not rerun now keep their last record (with its date)
    results = json.loads(summary.read_text()).get("parts", {}) if summary.exists() else {}
    for part in a.parts:  # the summary is rewritten after every part: a stopped run keeps what it finished
        kwargs = {"seeds": tuple(a.seeds)} if part == "real" else {}
        results[part] = {**globals()[f"part_{part}"](work, **kwargs), "date": time.strftime("%Y-%m-%d")}
        print(f"[accuracy] {part}: {results[part]['line']}", file=sys.stderr, flush=True)
        results = {k: results[k] for k in PARTS if k in results}
        write_result("accuracy", {"served": SERVED, "parts": results, "work": str(work)},
                     " | ".join(r["line"] for r in results.values()))


if __name__ == "__main__":
    main()
