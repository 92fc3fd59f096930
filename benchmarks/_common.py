"""Helpers shared by the benchmark scripts: child-process runs, peak memory, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from jobs.common import ray_data_defaults

ray_data_defaults(cpus=os.cpu_count() or 2)  # as for a job on this machine's CPUs

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median(xs: list[float]) -> float:
    """Median of a few figures (the runs of one measurement)."""
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def run_child(args: list[str], timeout: int | None = 3600, env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``python <args>`` in a fresh process (``env``: extra variables); its last stdout line is JSON."""
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), TQDM_DISABLE="1", **(env or {}))
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def write_result(name: str, result: dict, line: str) -> Path:
    """Write ``results/<name>.json`` (figures) and ``results/<name>.txt`` (the one-line summary)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {**result, "summary": line, "machine": machine()}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (RESULTS / f"{name}.txt").write_text(line + "\n")
    print(line)
    return path
