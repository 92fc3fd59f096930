"""Accuracy record: run the pipeline on a data set and keep its official metrics.

    python benchmarks/accuracy.py                       # real DCASE 2024 RoboticArm clips
    python benchmarks/accuracy.py --data synthetic      # the embedded default corpus

Runs ``python -m jobs.pipeline data=<data>`` in a fresh process (root under a temp
folder) and copies ``metrics.json`` and ``report.md`` of every scored embedding to
``results/accuracy_<data>_<tag>.{json,md}``. Later encoders must beat these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="roboticarm")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for jobs.pipeline")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="asd-accuracy-")
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), ASD_HYDRA_DIR=f"{work}/hydra")
    if a.data == "roboticarm" and "ASD_REAL_DATA" not in env:
        env["ASD_REAL_DATA"] = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    cmd = [sys.executable, "-m", "jobs.pipeline", f"data={a.data}", f"root={work}/run", "ray.progress=false", *a.overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parents[1]))
    if out.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{out.stderr[-4000:]}")
    final = json.loads(out.stdout.strip().splitlines()[-1])
    scores = Path(work) / "run" / "scores"
    lines, figures = [], {}
    for tag_dir in sorted(p for p in scores.iterdir() if p.is_dir()):
        m = json.loads((tag_dir / "metrics.json").read_text())
        shutil.copy(tag_dir / "report.md", RESULTS / f"accuracy_{a.data}_{tag_dir.name}.md")
        figures[tag_dir.name] = m
        lines.append(f"{tag_dir.name}: {100 * m['official_score']:.2f} %")
    line = f"accuracy on {a.data} (official DCASE hmean of AUC-s, AUC-t, pAUC): " + "; ".join(lines)
    write_result(f"accuracy_{a.data}", {"data": a.data, "command": " ".join(cmd[1:]), "metrics": figures,
                                        "stages": final["stages"]}, line)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
