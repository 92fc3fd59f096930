"""The paper's ablation on real recordings: the complete DCASE 2023 ToyCar development set.

    ASD_REAL_DATA=/data python -m benchmarks.toycar_ablation            # seeds 0 1 2 (about 1 h on 2 cores)
    ASD_REAL_DATA=/data python -m benchmarks.toycar_ablation --no-ae    # without the autoencoder (25 min less)

The served architecture's log-mel CNN (``jobs/conf/recipe/cnn.yaml``) trained on three kinds of
labels, one ``jobs.evaluate`` run per training seed on ToyCar's one split (its train and test
folders):

* ``cnn_domain``: no attribute labels. ToyCar has one section, so type and section alone give one
  class; the CNN classifies source vs target domain instead;
* ``cnn``: Ward pseudo labels of the clips' log-mel statistics (what the served recipe uses);
* ``cnn_real``: the real attribute labels (car model, speed, microphone: 26 classes).

Beside them, in the seed-0 run: the baselines (the autoencoder as published, ``ae_mse`` and
``ae_mahalanobis``; log-mel kNN) and the training-free spectrum recipes (``spectrum``,
``spectrum_norm``), which have no seed. The dataset is built from its kit into
``$ASD_REAL_DATA/dcase2023_toycar_dev`` (docs/results.md says how); without it this exits with a
message. Writes ``results/toycar_ablation.{json,txt}``: per seed and method the official score,
AUC-source, AUC-target and pAUC; per method the median and range over seeds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_result  # noqa: E402
from benchmarks.accuracy import _domain_aucs, evaluate  # noqa: E402

ROWS = ("cnn_domain", "cnn", "cnn_real")  # the ablation: domain / pseudo / real labels
ONCE = ("logmel", "spectrum", "spectrum_norm")  # no training, no seed
AE = ("ae_mse", "ae_mahalanobis")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-ae", action="store_true", help="leave the autoencoder out of the first run")
    p.add_argument("--work", default=None, help="run roots (default: a new temp folder)")
    args = p.parse_args()
    real = Path(os.environ.get("ASD_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
    data = real / "dcase2023_toycar_dev"
    if not any(data.glob("*/train/*.wav")):
        sys.exit(f"{data} has no clips: build the ToyCar set first (docs/results.md) and set ASD_REAL_DATA")
    work = Path(args.work or tempfile.mkdtemp(prefix="asd-toycar-"))
    runs = []
    for i, seed in enumerate(args.seeds):
        methods = list(ROWS) + ([*ONCE, *([] if args.no_ae else AE)] if i == 0 else [])
        extra = [] if seed == 0 else ["recipe_overrides=['models.cnn.train.seed=" + str(seed) + "']"]
        rep = evaluate(str(data), methods, work / f"toycar-s{seed}", work, f"toycar_ablation_seed{seed}",
                       extra=extra)
        per = {m: {"official": d["official_score"], **_domain_aucs(d["metrics"])} for m, d in rep["methods"].items()}
        runs.append({"seed": seed, "metrics": per, "seconds": rep["seconds"]})
        print(f"[toycar] seed {seed}: " + ", ".join(f"{m} {100 * v['official']:.2f}" for m, v in per.items()),
              file=sys.stderr, flush=True)
    summary = {}
    for m in [*ROWS, *ONCE, *AE]:
        vals = [r["metrics"][m]["official"] for r in runs if m in r["metrics"]]
        if vals:
            summary[m] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
    base = max(summary[m]["median"] for m in (*AE, "logmel") if m in summary)
    line = ("ToyCar (DCASE 2023 dev, official %, median [min..max] over seeds "
            + ",".join(map(str, args.seeds)) + "): "
            + "; ".join(f"{m} {100 * s['median']:.2f}" + (f" [{100 * s['min']:.2f}..{100 * s['max']:.2f}]"
                                                           if s["n"] > 1 else "")
                        for m, s in summary.items())
            + f"; better baseline {100 * base:.2f}")
    write_result("toycar_ablation", {"runs": runs, "per_method": summary, "better_baseline": base,
                                     "seeds": args.seeds, "ae": not args.no_ae}, line)
    print(line)


if __name__ == "__main__":
    main()
