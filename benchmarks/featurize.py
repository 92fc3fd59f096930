"""Featurization throughput: Ray Data on all cores vs a single-process loop doing the same work.

    python benchmarks/featurize.py                 # 2,000 ten-second clips (the issue's size)
    python benchmarks/featurize.py --clips 200     # quick look

One run generates the corpus (cached), then, each in a fresh process:
  * baseline: one thread, soundfile decode + the same Kaldi fbank + the same Parquet
    columns written with pyarrow;
  * the Ray Data job (``asd.featurize.featurize``) for a few batch/resource settings, twice in
    one Ray session: cold (workers start and import torch) and warm (steady state).
It writes clips/s of each, the ratio ray/baseline (target >= 0.8 x cores, judged on the
warm run; the cold ratio is reported beside it), and the
peak memory of each driver process to ``results/featurize.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import peak_rss_mb, run_child, write_result  # noqa: E402

SETTINGS = [  # (batch_size, rows_per_block, num_cpus per task)
    (64, 256, 1.0),
    (16, 64, 1.0),
    (8, 16, 1.0),
    (64, 256, 0.5),
]


def make(corpus: str, clips: int, seconds: float) -> None:
    from asd.data.synthetic import default_spec, make_corpus

    marker = Path(corpus) / "_BENCH.json"
    want = f"{clips}/{seconds}"
    if marker.exists() and marker.read_text() == want:
        return
    shutil.rmtree(corpus, ignore_errors=True)
    n_types = 4
    per_type = clips // n_types
    n_test = max(2, per_type // 5) // 2 * 2
    spec = default_spec(n_train_source=per_type - n_test - 2, n_train_target=2, n_test_per_domain=n_test // 2,
                        duration_s=seconds, seed=1)
    make_corpus(spec, corpus, workers=os.cpu_count() or 1, progress=False)
    marker.write_text(want)


def baseline(corpus: str, out: str) -> dict:
    """The same work in one thread: list, decode, fbank, write Parquet with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf
    import torch

    from asd.data.audio import sha256
    from asd.data.manifest import build_manifest
    from asd.featurize import FbankConfig, compute_fbank

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    manifest = build_manifest(corpus, probe=False).table.to_pylist()
    cfg = FbankConfig()
    rows, n, part = [], 0, 0
    os.makedirs(out, exist_ok=True)

    def flush():
        nonlocal rows, part
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), f"{out}/part-{part:05d}.parquet")
            rows, part = [], part + 1

    for r in manifest:
        data = Path(r["path"]).read_bytes()
        import io

        wave, sr = sf.read(io.BytesIO(data), dtype="float32")
        fb = compute_fbank(wave, cfg).astype(cfg.dtype)
        rows.append({**{k: r[k] for k in ("clip_id", "path", "machine_type", "section", "domain", "split", "label",
                                          "clip_index", "attribute_string")},
                     "attributes": r["attributes"], "sample_rate": sr, "duration_s": len(wave) / sr,
                     "content_sha256": sha256(data), "num_mel_bins": fb.shape[1], "fbank_frames": fb.shape[0],
                     "fbank_dtype": cfg.dtype, "fbank": fb.tobytes()})
        n += 1
        if len(rows) >= 64:
            flush()
    flush()
    dt = time.perf_counter() - t0
    return {"clips": n, "seconds": dt, "clips_per_s": n / dt, "peak_rss_mb": peak_rss_mb()}


def ray_job(corpus: str, out: str, batch_size: int, rows_per_block: int, num_cpus: float) -> dict:
    import ray

    from asd.featurize import FeaturizeConfig, featurize

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = FeaturizeConfig(batch_size=batch_size, rows_per_block=rows_per_block, num_cpus=num_cpus,
                          progress=False, compute_stats=True)
    runs = []
    # cold: the job as run once on a fresh cluster (its workers import torch on their first task);
    # warm: the same job again into a new output, as on a long-lived cluster or a corpus large
    # enough that worker start-up no longer counts. Steady-state throughput is the warm run.
    for name in ("cold", "warm"):
        t0 = time.perf_counter()
        res = featurize(corpus, f"{out}/{name}", cfg)
        dt = time.perf_counter() - t0
        runs.append({"clips": res.n_featurized, "seconds": dt, "clips_per_s": res.n_featurized / dt,
                     "quarantined": res.n_quarantined})
        shutil.rmtree(f"{out}/{name}", ignore_errors=True)
    cold, warm = runs
    return {**warm, "cold": cold, "peak_rss_mb": peak_rss_mb(),
            "batch_size": batch_size, "rows_per_block": rows_per_block, "num_cpus": num_cpus}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "asd-bench-featurize"))
    p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, corpus, out, *rest = a.child
        import json

        res = baseline(corpus, out) if kind == "baseline" else ray_job(corpus, out, int(rest[0]), int(rest[1]), float(rest[2]))
        print(json.dumps(res))
        return
    corpus = os.path.join(a.workdir, "corpus")
    make(corpus, a.clips, a.seconds)
    me = os.path.abspath(__file__)
    out = os.path.join(a.workdir, "out")
    shutil.rmtree(out, ignore_errors=True)
    base = run_child([me, "--child", "baseline", corpus, out + "/baseline"])
    runs = []
    for i, (bs, rpb, cpus) in enumerate(SETTINGS):
        r = run_child([me, "--child", "ray", corpus, f"{out}/ray{i}", str(bs), str(rpb), str(cpus)])
        r["ratio_vs_baseline"] = r["clips_per_s"] / base["clips_per_s"]
        r["cold"]["ratio_vs_baseline"] = r["cold"]["clips_per_s"] / base["clips_per_s"]
        runs.append(r)
        print(f"ray batch={bs} block={rpb} cpus/task={cpus}: {r['clips_per_s']:.1f} clips/s warm, "
              f"{r['cold']['clips_per_s']:.1f} cold ({r['ratio_vs_baseline']:.2f}x / "
              f"{r['cold']['ratio_vs_baseline']:.2f}x baseline {base['clips_per_s']:.1f})", flush=True)
    best = max(runs, key=lambda r: r["clips_per_s"])
    cores = os.cpu_count() or 1
    line = (f"featurize: {best['clips_per_s']:.1f} clips/s with Ray Data on {cores} cores vs "
            f"{base['clips_per_s']:.1f} clips/s single-process = {best['ratio_vs_baseline']:.2f}x warm, "
            f"{best['cold']['ratio_vs_baseline']:.2f}x cold incl. worker start-up "
            f"(target {0.8 * cores:.1f}x; best batch={best['batch_size']} block={best['rows_per_block']} "
            f"cpus/task={best['num_cpus']}; driver peak {best['peak_rss_mb']:.0f} MiB; {a.clips} x {a.seconds:g} s clips)")
    write_result("featurize", {"clips": a.clips, "clip_seconds": a.seconds, "baseline": base, "ray": runs,
                               "best": best, "target_ratio": 0.8 * cores}, line)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
