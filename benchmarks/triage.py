"""The triage page of a night of 1,000 clips: the time to write it and the size of its folder, beside
the night's rescoring without a page (the baseline, measured in the same run on the same machine).

    python benchmarks/triage.py               # 1,000 clips of 2 s; and a night of 10-s clips for the folder size

A generated corpus (``asd.data.synthetic``, 4 machine types, 2-s clips) is featurized and embedded
into a served root (log-mel statistics). Its first 1,000 test clips are one night's inbox: 50 of
them muffled (a moving average: clear anomalies, so that the page shows its full ten with media and
lists the rest) and 20 replaced by generated sensor faults. The night is rescored on two copies of
the root, without the page (``score.page.enabled=false``) and with it; then the page alone (gathering
its data and writing it) is timed three more times on the published night (median). A second,
small night of 10-s clips (the DCASE length) gives the folder size where the copied WAVs weigh most.
Writes ``results/triage.{json,txt}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import median, peak_rss_mb, write_result  # noqa: E402


def _faults(sr: int, seconds: float, rng):
    import numpy as np

    n = int(sr * seconds)
    base = (0.05 * rng.standard_normal(n)).astype(np.float32)
    gap = base.copy()
    gap[n // 2: n // 2 + sr // 20] = 0
    return [np.zeros(n, np.float32), np.clip(30 * base, -1, 1).astype(np.float32), gap, base + 0.1, base[: n // 4]]


def make_inbox(corpus: Path, inbox: Path, n: int, muffled: int, faulty: int, seed: int = 0) -> int:
    """``n`` test clips of ``corpus`` under evaluation-style names; every (n // muffled)-th muffled,
    every (n // faulty)-th (offset by one) a sensor fault."""
    import numpy as np
    import soundfile as sf

    from asd.data import audio

    rng = np.random.default_rng(seed)
    clips = sorted(corpus.glob("*/test/*.wav"))[:n]
    for i, f in enumerate(clips):
        dst = inbox / f.parent.parent.name / "test" / f"section_00_{i:05d}.wav"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if muffled and i % (n // muffled) == 0:
            x, sr = sf.read(f, dtype="float32")
            dst.write_bytes(audio.encode_wav(np.convolve(x, np.ones(8) / 8, "same").astype(np.float32), sr))
        elif faulty and i % (n // faulty) == 1:
            sr = sf.info(f).samplerate
            waves = _faults(sr, sf.info(f).duration, rng)
            dst.write_bytes(audio.encode_wav(waves[i % len(waves)], sr))
        else:
            shutil.copy(f, dst)
    return len(clips)


def served_root(base: Path, duration_s: float, per_domain: int, train: int):
    from asd.data.synthetic import default_spec, make_corpus
    from asd.io.serving import set_current_model
    from asd.stages.embed import EmbedConfig, embed
    from asd.stages.featurize import FeaturizeConfig, featurize

    corpus, root = base / "corpus", base / "served"
    make_corpus(default_spec(n_train_source=train, n_train_target=max(2, train // 4), n_test_per_domain=per_domain,
                             duration_s=duration_s, seed=3), str(corpus), workers=os.cpu_count() or 1, progress=False)
    featurize(str(corpus), str(root), FeaturizeConfig(progress=False))
    embed(str(root), "logmel", EmbedConfig(progress=False))
    set_current_model(str(root), "logmel", "logmel_stats", {})
    return corpus, root


def copy_root(served: Path, dst: Path) -> Path:
    from asd.io.serving import set_current_model

    shutil.copytree(served, dst)
    set_current_model(str(dst), "logmel", "logmel_stats", {})
    return dst


def folder_size(folder: Path) -> dict:
    files = [f for f in folder.rglob("*") if f.is_file()]
    return {"bytes": sum(f.stat().st_size for f in files), "files": len(files),
            "wav": sum(1 for f in files if f.suffix == ".wav"), "png": sum(1 for f in files if f.suffix == ".png"),
            "wav_bytes": sum(f.stat().st_size for f in files if f.suffix == ".wav")}


def rescore_night(root: Path, inbox: Path, date: str, page: bool) -> tuple[float, object]:
    from asd.stages.featurize import FeaturizeConfig
    from asd.stages.rescore import RescoreConfig, rescore
    from asd.stages.score import ScoreConfig

    score = ScoreConfig(progress=False)
    score = replace(score, page=replace(score.page, enabled=page))
    cfg = RescoreConfig(featurize=FeaturizeConfig(progress=False), score=score)
    t0 = time.perf_counter()
    res = rescore(str(inbox), str(root), date=date, cfg=cfg)
    return time.perf_counter() - t0, res


def page_alone(root: Path, res, inbox: Path, out: Path) -> float:
    """Gather the published night's page data and write the page into ``out`` (what rescoring does
    inside its publish step)."""
    import pyarrow.parquet as pq

    from asd.io import layout, storage
    from asd.io.serving import current_model
    from asd.reports.triage import PageConfig, write_page
    from asd.stages import triage

    t0 = time.perf_counter()
    table = pq.read_table(Path(res.partition) / "scores.parquet")
    about = {"n_inbox": res.n_inbox, "n_new": res.n_new, "n_already_scored": res.n_already_scored, "rejected": {}}
    page = triage.night_page(str(root), res.date, table, layout.rescore_work_dir(str(root), res.date),
                             current_model(str(root)), str(inbox), about, PageConfig(), condensed=False)
    storage.remove(str(out))
    write_page(str(out), page, PageConfig())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print the line, write no result files")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    base = Path(tempfile.mkdtemp(prefix="asd-triage-bench-"))
    try:
        per_domain = -(-args.clips // 8)  # 4 types x 2 domains
        corpus, served = served_root(base / "short", 2.0, per_domain, train=20)
        inbox = base / "inbox" / "2026-12-01"
        n = make_inbox(corpus, inbox, args.clips, muffled=args.clips // 20, faulty=args.clips // 50)
        without_s, _ = rescore_night(copy_root(served, base / "without"), inbox, "2026-12-01", page=False)
        with_root = copy_root(served, base / "with")
        with_s, res = rescore_night(with_root, inbox, "2026-12-01", page=True)
        folder = Path(res.partition) / "report"
        size = folder_size(folder)
        alone = [page_alone(with_root, res, inbox, base / f"page-{i}") for i in range(args.rounds)]
        # the DCASE length: 10-s clips, where the copied WAVs weigh most
        corpus10, served10 = served_root(base / "long", 10.0, 4, train=6)
        inbox10 = base / "inbox10" / "2026-12-01"
        n10 = make_inbox(corpus10, inbox10, 32, muffled=16, faulty=4)
        _, res10 = rescore_night(copy_root(served10, base / "with10"), inbox10, "2026-12-01", page=True)
        size10 = folder_size(Path(res10.partition) / "report")
        result = {
            "clips": n, "anomalies": res.n_anomalies, "sensor_faults": res.n_sensor_faults,
            "page_seconds_median": median(alone), "page_seconds": alone,
            "rescore_seconds_without_page": without_s, "rescore_seconds_with_page": with_s,
            "folder": size, "clips_10s": n10, "folder_10s": size10, "peak_rss_mb": peak_rss_mb(),
        }
        line = (f"triage page, a night of {n} clips of 2 s ({res.n_anomalies} above threshold, {res.n_sensor_faults} "
                f"sensor faults): written in {median(alone):.2f} s (median of {args.rounds}; rescoring the night took "
                f"{without_s:.1f} s without the page, {with_s:.1f} s with it); folder {size['bytes'] / 1e6:.2f} MB "
                f"({size['wav']} WAVs, {size['png']} PNGs); with 10-s clips {size10['bytes'] / 1e6:.2f} MB "
                f"({size10['wav']} WAVs, {size10['wav_bytes'] / 1e6:.2f} MB of them)")
        if args.no_write:
            print(line)
        else:
            write_result("triage", result, line)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
