"""Featurization throughput: Ray Data on all cores vs a single-process loop doing the same work.

    python benchmarks/featurize.py                 # 2,000 ten-second clips (the issue's size)
    python benchmarks/featurize.py --clips 200     # quick look

One run generates the corpus (cached), then, each in a fresh process:
  * baseline: the same work in one process and one thread without Ray: the job's own per-clip
    function (read, sha256, checked soundfile decode, Kaldi fbank, per-bin sums) over batches of
    64 clips, and the same Parquet files (columns, partition folders) written with pyarrow;
  * for reference, a leaner loop (decode + fbank only, fewer columns), not judged;
  * the Ray Data job (``asd.stages.featurize.featurize``) for a few batch/resource settings, twice in
    one Ray session: cold (workers start and import torch) and warm (steady state). Its
    committed rows must hash the same as the baseline's, or the benchmark fails.
The job's default setting (``FeaturizeConfig``, the first of the sweep, chosen from these runs)
then runs in ``--rounds`` baseline/Ray pairs back to back; the judged figure is the median of the
pairs' ratios (target >= 0.8 x cores, on the warm run; the cold ratio beside
it). Figures, driver peak memory and every run go to ``results/featurize.json``.
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

from benchmarks._common import median, peak_rss_mb, run_child, write_result  # noqa: E402

SETTINGS = [  # besides the job's default: (batch_size, rows_per_block (the first, largest blocks), num_cpus per task)
    (64, 256, 1.0),
    (64, 128, 1.0),
    (32, 256, 1.0),
    (16, 64, 1.0),
    (64, 512, 0.5),
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


def _digest(root: str) -> dict:
    """What was written, independent of file layout: the number of clips and a hash over every
    clip's id, source hash, feature bytes and per-bin sums, in clip order (read batch by batch)."""
    import hashlib

    import pyarrow.dataset as pds

    per_clip = {}
    for b in pds.dataset(root, format="parquet", partitioning="hive").to_batches(
            columns=["clip_id", "content_sha256", "fbank", "fbank_sum", "fbank_sumsq"], batch_size=64):
        for r in b.to_pylist():
            h = hashlib.sha256(f"{r['clip_id']}|{r['content_sha256']}|".encode())
            h.update(r["fbank"])
            h.update(repr([round(v, 3) for v in r["fbank_sum"] + r["fbank_sumsq"]]).encode())
            per_clip[r["clip_id"]] = h.hexdigest()
    whole = hashlib.sha256("".join(per_clip[k] for k in sorted(per_clip)).encode()).hexdigest()
    return {"clips": len(per_clip), "sha256": whole}


def baseline(corpus: str, out: str) -> dict:
    """The same work in one process and one thread, without Ray: list the corpus, then for every
    batch of 64 clips the job's own per-clip work (read, hash, checked decode, Kaldi fbank, per-bin
    sums; ``asd.stages.featurize.featurize_batch``), written with pyarrow as the same Parquet files
    (the same columns, one folder per machine type and section)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from asd.data.manifest import build_manifest
    from asd.stages.featurize import FeaturizeConfig, featurize_batch
    from asd.stores.features import FEATURE_WRITE_OPTIONS, PARTITION_COLS

    torch.set_num_threads(1)
    cfg = FeaturizeConfig()
    t0 = time.perf_counter()
    manifest = build_manifest(corpus, probe=False).table
    n = 0
    for part, i in enumerate(range(0, manifest.num_rows, cfg.batch_size)):
        table = featurize_batch(manifest.slice(i, cfg.batch_size), cfg, {}, f"{out}/_quarantine", "baseline")
        n += table.num_rows
        keys = table.select(PARTITION_COLS).group_by(PARTITION_COLS).aggregate([]).to_pylist()
        for key in keys:
            mask = pc.and_(*(pc.equal(table.column(c), key[c]) for c in PARTITION_COLS))
            folder = os.path.join(out, *(f"{c}={key[c]}" for c in PARTITION_COLS))
            os.makedirs(folder, exist_ok=True)
            pq.write_table(table.filter(mask).drop_columns(PARTITION_COLS), f"{folder}/part-{part:05d}.parquet",
                           **FEATURE_WRITE_OPTIONS)
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()  # before the check below reads the output back
    return {"clips": n, "seconds": dt, "clips_per_s": n / dt, "peak_rss_mb": peak, "output": _digest(out)}


def minimal(corpus: str, out: str) -> dict:
    """For reference only: a leaner loop than the job's work (soundfile decode and the Kaldi fbank,
    no input checks, no per-bin sums, fewer columns, no partition folders)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf
    import torch

    from asd.data.audio import sha256
    from asd.data.frontend import FbankConfig, compute_fbank
    from asd.data.manifest import build_manifest
    from asd.stores.features import FEATURE_WRITE_OPTIONS

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    manifest = build_manifest(corpus, probe=False).table.to_pylist()
    cfg = FbankConfig()
    rows, n, part = [], 0, 0
    os.makedirs(out, exist_ok=True)

    def flush():
        nonlocal rows, part
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), f"{out}/part-{part:05d}.parquet", **FEATURE_WRITE_OPTIONS)
            rows, part = [], part + 1

    for r in manifest:
        data = Path(r["path"]).read_bytes()
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

    from asd.stages.featurize import FeaturizeConfig, featurize
    from asd.stores.features import committed_files

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
        if name == "warm":  # what was committed, to compare with the baseline's files
            peak = peak_rss_mb()  # before the check reads the output back
            assert committed_files(f"{out}/{name}")
            runs[-1]["output"] = _digest(f"{out}/{name}/features")
        shutil.rmtree(f"{out}/{name}", ignore_errors=True)
    cold, warm = runs
    return {**warm, "cold": cold, "peak_rss_mb": peak,
            "batch_size": batch_size, "rows_per_block": rows_per_block, "num_cpus": num_cpus}


def main() -> None:
    from asd.stages.featurize import FeaturizeConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=5, help="baseline/Ray pairs for the default setting")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "asd-bench-featurize"))
    p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import json

        kind, corpus, out, *rest = a.child
        shutil.rmtree(out, ignore_errors=True)
        if kind == "baseline":
            res = baseline(corpus, out)
        elif kind == "minimal":
            res = minimal(corpus, out)
        else:
            res = ray_job(corpus, out, int(rest[0]), int(rest[1]), float(rest[2]))
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(res))
        return
    corpus = os.path.join(a.workdir, "corpus")
    make(corpus, a.clips, a.seconds)
    me = os.path.abspath(__file__)
    out = os.path.join(a.workdir, "out")

    def base_run() -> dict:
        return run_child([me, "--child", "baseline", corpus, out + "/baseline"])

    def ray_run(bs: int, rpb: int, cpus: float) -> dict:
        r = run_child([me, "--child", "ray", corpus, out + "/ray", str(bs), str(rpb), str(cpus)])
        if r["output"] != base["output"]:
            raise AssertionError(f"Ray output {r['output']} differs from the baseline's {base['output']}")
        return r

    ref = run_child([me, "--child", "minimal", corpus, out + "/minimal"])
    base = base_run()
    print(f"baseline (same work, one process): {base['clips_per_s']:.1f} clips/s; "
          f"leaner reference loop: {ref['clips_per_s']:.1f}", flush=True)
    sweep = []
    d = FeaturizeConfig()
    job_default = (d.batch_size, d.rows_per_block, d.num_cpus)
    settings = [job_default] + [s for s in SETTINGS if s != job_default]
    for bs, rpb, cpus in settings:  # the first is the job's default
        r = ray_run(bs, rpb, cpus)
        r["ratio_vs_baseline"] = r["clips_per_s"] / base["clips_per_s"]
        r["cold"]["ratio_vs_baseline"] = r["cold"]["clips_per_s"] / base["clips_per_s"]
        sweep.append(r)
        print(f"ray batch={bs} block={rpb} cpus/task={cpus}: {r['clips_per_s']:.1f} clips/s warm, "
              f"{r['cold']['clips_per_s']:.1f} cold ({r['ratio_vs_baseline']:.2f}x / "
              f"{r['cold']['ratio_vs_baseline']:.2f}x baseline {base['clips_per_s']:.1f})", flush=True)
    best = max(sweep, key=lambda r: r["clips_per_s"])
    # Judge what users get: the default setting, not the best single run of a noisy sweep.
    default = sweep[0]
    setting = (default["batch_size"], default["rows_per_block"], default["num_cpus"])
    # The machine's speed drifts by 10-20 % from minute to minute (shared hosts): the judged figure
    # is the median over pairs run back to back, baseline then Ray, each pair's own ratio.
    rounds = []
    for i in range(a.rounds):
        b = base if i == 0 else base_run()
        r = default if i == 0 else ray_run(*setting)
        rounds.append({"baseline_clips_per_s": b["clips_per_s"], "warm_clips_per_s": r["clips_per_s"],
                       "cold_clips_per_s": r["cold"]["clips_per_s"], "warm_ratio": r["clips_per_s"] / b["clips_per_s"],
                       "cold_ratio": r["cold"]["clips_per_s"] / b["clips_per_s"],
                       "driver_peak_rss_mb": r["peak_rss_mb"]})
        print(f"round {i + 1}: {rounds[-1]['warm_ratio']:.2f}x warm, {rounds[-1]['cold_ratio']:.2f}x cold", flush=True)
    warm_ratio = median([x["warm_ratio"] for x in rounds])
    cold_ratio = median([x["cold_ratio"] for x in rounds])
    # the sweep ran against the first baseline only; one slow minute there would inflate every
    # sweep ratio, so they are restated against the median of all the rounds' baselines
    base_median = median([x["baseline_clips_per_s"] for x in rounds])
    for r in sweep:
        r["ratio_vs_baseline"] = r["clips_per_s"] / base_median
        r["cold"]["ratio_vs_baseline"] = r["cold"]["clips_per_s"] / base_median
    print("sweep vs the median baseline (%.1f clips/s): %s" % (base_median, ", ".join(
        f"block={r['rows_per_block']} batch={r['batch_size']} cpus={r['num_cpus']:g} {r['ratio_vs_baseline']:.2f}x"
        for r in sweep)), flush=True)
    cores = os.cpu_count() or 1
    line = (f"featurize: Ray Data on {cores} cores vs the same work in one process, median of {len(rounds)} pairs: "
            f"{warm_ratio:.2f}x warm, {cold_ratio:.2f}x cold incl. worker start-up (target {0.8 * cores:.1f}x; "
            f"{median([x['warm_clips_per_s'] for x in rounds]):.1f} vs {base_median:.1f} clips/s; "
            f"default batch={setting[0]} block={setting[1]} cpus/task={setting[2]:g} (best single sweep run: "
            f"batch={best['batch_size']} block={best['rows_per_block']} cpus/task={best['num_cpus']:g}, "
            f"{best['ratio_vs_baseline']:.2f}x of the median baseline); "
            f"driver peak {max(x['driver_peak_rss_mb'] for x in rounds):.0f} MiB; outputs identical; "
            f"{a.clips} x {a.seconds:g} s clips; leaner loop {ref['clips_per_s']:.1f} clips/s)")
    write_result("featurize", {"clips": a.clips, "clip_seconds": a.seconds, "baseline": base, "reference_loop": ref,
                               "ray": sweep, "best": best, "default": default, "rounds": rounds, "warm_ratio_median": warm_ratio,
                               "cold_ratio_median": cold_ratio, "baseline_median_clips_per_s": base_median,
                               "target_ratio": 0.8 * cores}, line)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
