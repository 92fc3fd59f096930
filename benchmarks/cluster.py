"""Pseudo-attribute clustering: exact Ward vs chunked (micro-clusters + size-weighted Ward).

    python benchmarks/cluster.py                 # full: 5k/20k/50k comparison + 200k and 1M chunked
    python benchmarks/cluster.py --quick         # 5k comparison + 200k chunked (a smoke run)

Data: ``K`` planted Gaussian clusters around random unit centres in d=768 with
unequal sizes, generated chunk by chunk from a seed. For 200k and 1M points the
parent writes them chunk by chunk to a ``.npy`` file (1M x 768 float32 = 3 GB,
never in memory at once; not timed) and the child clusters the memory-mapped
array: the same path as the stage's per-type task on an array (a MiniBatchKMeans
fit on 262k rows sampled at random, then an assignment pass over all chunks).
Every measurement runs in a fresh child process (peak RSS = that process's
high-water mark; it includes the pages of the memory-mapped file it touched).

* ``exact_sklearn``: ``sklearn.cluster.AgglomerativeClustering(linkage="ward")`` on
  the L2-normalised points (the baseline; scipy pdist + nn-chain, O(n^2) memory).
* ``exact_asd``: ``asd.algorithms.ward.ward_exact`` (the stage's exact path: same Ward tree,
  distances with BLAS), for reference.
* ``chunked``: ``asd.algorithms.ward.ward_chunked`` (n_micro=4096, chunk_size=65536) + cut
  at K, plus the automatic cluster count (gap) on the same tree.

Targets: chunked >= 10x faster than exact Ward at 20k with ARI >= 0.9 against
exact Ward's labels; 1M x 768 in under 10 minutes within 24 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import peak_rss_mb, run_child, write_result  # noqa: E402

DIM = 768
K = 12
NOISE = 1.5
SEED = 0
GEN_CHUNK = 65_536
COMPARE = [5_000, 20_000, 50_000]
SCALE = [200_000, 1_000_000]
EXACT_MAX_N = 20_000  # exact Ward above this would not fit next to other jobs (see skip reason)
N_MICRO = 4096
CHUNK = 65_536


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def _centres():
    import numpy as np

    rng = np.random.default_rng([SEED, 10**6])
    c = rng.normal(size=(K, DIM))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    p = rng.dirichlet(np.full(K, 2.0))
    return c.astype(np.float32), p


def gen_chunk(i: int, rows: int):
    """Chunk ``i`` of the planted data: (x float32 (rows, DIM), planted labels int16)."""
    import numpy as np

    c, p = _centres()
    rng = np.random.default_rng([SEED, i])
    y = rng.choice(K, size=rows, p=p).astype(np.int16)
    x = rng.standard_normal((rows, DIM), dtype=np.float32)
    x *= NOISE / np.sqrt(DIM)
    x += c[y]
    return x, y


def chunk_sizes(n: int) -> list[int]:
    return [min(GEN_CHUNK, n - i) for i in range(0, n, GEN_CHUNK)]


def gen_all(n: int):
    import numpy as np

    parts = [gen_chunk(i, r) for i, r in enumerate(chunk_sizes(n))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def l2n(x):
    import numpy as np

    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- #
# children (one measurement each, in a fresh process)
# --------------------------------------------------------------------------- #
def child_exact_sklearn(n: int, out: str) -> dict:
    import numpy as np
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score

    x, y = gen_all(n)
    x = l2n(x)
    t0 = time.perf_counter()
    labels = AgglomerativeClustering(n_clusters=K, linkage="ward").fit(x).labels_
    dt = time.perf_counter() - t0
    np.save(out, labels)
    return {"seconds": dt, "peak_rss_mb": peak_rss_mb(), "ari_planted": adjusted_rand_score(y, labels),
            "labels": out}


def child_exact_asd(n: int, out: str) -> dict:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from asd.algorithms.ward import WardConfig, choose_n_clusters, cut, ward_exact

    x, y = gen_all(n)
    t0 = time.perf_counter()
    Z = ward_exact(x)
    labels = cut(Z, K)
    dt = time.perf_counter() - t0
    np.save(out, labels)
    return {"seconds": dt, "peak_rss_mb": peak_rss_mb(), "ari_planted": adjusted_rand_score(y, labels),
            "auto_n_clusters": choose_n_clusters(Z, WardConfig()), "labels": out}


def child_chunked(n: int, out: str, data_path: str | None) -> dict:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from asd.algorithms.ward import WardConfig, choose_n_clusters, cut, ward_chunked

    cfg = WardConfig(n_micro=N_MICRO, chunk_size=CHUNK, seed=SEED)
    if data_path:  # a memory-mapped .npy written beforehand: streamed from disk / page cache
        data = np.load(data_path, mmap_mode="r")
        y = np.load(data_path.replace(".npy", "_y.npy"))
    else:
        data, y = gen_all(n)
    t0 = time.perf_counter()
    cw = ward_chunked(data, cfg)
    t_tree = time.perf_counter() - t0
    labels = cut(cw.linkage, K)[cw.micro_labels]
    auto_k = choose_n_clusters(cw.linkage, cfg)
    dt = time.perf_counter() - t0
    np.save(out, labels)
    return {"seconds": dt, "tree_seconds": t_tree, "peak_rss_mb": peak_rss_mb(),
            "ari_planted": adjusted_rand_score(y, labels), "auto_n_clusters": auto_k,
            "n_micro": int(len(cw.sizes)), "micro_size_min_median_max": [int(cw.sizes.min()),
            int(np.median(cw.sizes)), int(cw.sizes.max())], "source": "memmap" if data_path else "memory",
            "labels": out}


def write_npy(n: int, path: str) -> float:
    """Write the planted data as ``path`` (.npy, chunk by chunk: memory stays bounded) + labels."""
    import numpy as np

    t0 = time.perf_counter()
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    y = np.empty(n, np.int16)
    for i, r in enumerate(chunk_sizes(n)):
        x[i * GEN_CHUNK:i * GEN_CHUNK + r], y[i * GEN_CHUNK:i * GEN_CHUNK + r] = gen_chunk(i, r)
    x.flush()
    del x
    np.save(path.replace(".npy", "_y.npy"), y)
    return time.perf_counter() - t0


CHILDREN = {"exact_sklearn": child_exact_sklearn, "exact_asd": child_exact_asd}


# --------------------------------------------------------------------------- #
# parent
# --------------------------------------------------------------------------- #
def run(kind: str, n: int, tmp: str, data_path: str | None = None) -> dict:
    out = os.path.join(tmp, f"{kind}_{n}.npy")
    args = [__file__, "--child", kind, "--n", str(n), "--out", out] + (["--data", data_path] if data_path else [])
    t0 = time.perf_counter()
    res = run_child(args, timeout=3600)
    res["wall_seconds"] = time.perf_counter() - t0
    print(f"  {kind:14s} n={n:>9,}: {res['seconds']:8.1f} s  peak {res['peak_rss_mb'] / 1024:5.2f} GiB  "
          f"ARI(planted) {res['ari_planted']:.3f}", flush=True)
    return res


def ari_files(a: str, b: str) -> float:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.load(a), np.load(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--n", type=int)
    ap.add_argument("--out")
    ap.add_argument("--data", help="memory-mapped .npy input of a chunked child")
    ap.add_argument("--quick", action="store_true", help="5k comparison + 200k chunked only")
    args = ap.parse_args()
    if args.child:
        if args.child == "chunked":
            res = child_chunked(args.n, args.out, args.data)
        else:
            res = CHILDREN[args.child](args.n, args.out)
        print(json.dumps(res))
        return

    compare = [5_000] if args.quick else COMPARE
    scale = [200_000] if args.quick else SCALE
    result = {"dim": DIM, "planted_clusters": K, "noise": NOISE, "n_micro": N_MICRO, "chunk_size": CHUNK,
              "compare": [], "scale": [], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        for n in compare:
            print(f"n={n}", flush=True)
            row: dict = {"n": n}
            row["chunked"] = run("chunked", n, tmp)
            if n <= EXACT_MAX_N:
                row["exact_sklearn"] = run("exact_sklearn", n, tmp)
                row["exact_asd"] = run("exact_asd", n, tmp)
                row["ari_chunked_vs_exact"] = ari_files(row["chunked"]["labels"], row["exact_sklearn"]["labels"])
                row["ari_exact_asd_vs_sklearn"] = ari_files(row["exact_asd"]["labels"], row["exact_sklearn"]["labels"])
                row["speedup_vs_sklearn"] = row["exact_sklearn"]["seconds"] / row["chunked"]["seconds"]
                row["speedup_vs_exact_asd"] = row["exact_asd"]["seconds"] / row["chunked"]["seconds"]
                print(f"  ARI chunked vs exact {row['ari_chunked_vs_exact']:.3f}; "
                      f"speed-up {row['speedup_vs_sklearn']:.1f}x (sklearn), {row['speedup_vs_exact_asd']:.1f}x (BLAS exact)")
            else:
                gib = 2 * (n * (n - 1) // 2) * 8 / 2**30
                prev = [r for r in result["compare"] if "exact_sklearn" in r]
                est = (prev[-1]["exact_sklearn"]["seconds"] * (n / prev[-1]["n"]) ** 2) if prev else None
                row["exact_skipped"] = (
                    f"exact Ward at n={n} needs the condensed distance matrix twice (pdist + scipy's nn-chain copy): "
                    f"{gib:.1f} GiB plus data, on a 24 GiB machine shared with other jobs; "
                    f"the O(n^2) time extrapolated from 20k would be ~{est / 60:.0f} min" if est else "")
                print(f"  exact skipped: {row['exact_skipped']}")
            for r in ("chunked", "exact_sklearn", "exact_asd"):
                row.get(r, {}).pop("labels", None)
            result["compare"].append(row)
        for n in scale:
            print(f"n={n}", flush=True)
            path = os.path.join(tmp, f"data_{n}.npy")
            write_seconds = write_npy(n, path)
            row = {"n": n, "data_write_seconds": write_seconds, "chunked": run("chunked", n, tmp, path)}
            row["chunked"].pop("labels", None)
            for f in (path, path.replace(".npy", "_y.npy")):
                os.remove(f)
            result["scale"].append(row)

    at20 = next((r for r in result["compare"] if r["n"] == 20_000), None)
    at1m = next((r for r in result["scale"] if r["n"] == 1_000_000), None)
    result["targets"] = {
        "speedup_20k_ge_10": None if at20 is None else at20["speedup_vs_sklearn"] >= 10,
        "ari_vs_exact_20k_ge_0.9": None if at20 is None else at20["ari_chunked_vs_exact"] >= 0.9,
        "1m_under_600s": None if at1m is None else at1m["chunked"]["seconds"] < 600,
        "1m_under_24gib": None if at1m is None else at1m["chunked"]["peak_rss_mb"] < 24 * 1024,
    }
    if at20 and at1m:
        line = (f"cluster: 20k x 768 chunked Ward {at20['chunked']['seconds']:.1f} s vs exact Ward (sklearn) "
                f"{at20['exact_sklearn']['seconds']:.0f} s = {at20['speedup_vs_sklearn']:.0f}x, ARI vs exact "
                f"{at20['ari_chunked_vs_exact']:.3f}; 1M x 768 chunked {at1m['chunked']['seconds']:.0f} s, peak "
                f"{at1m['chunked']['peak_rss_mb'] / 1024:.1f} GiB (targets >=10x, ARI>=0.9, <600 s, <24 GiB; "
                f"{os.cpu_count()} CPUs)")
    else:
        first = result["compare"][0]
        line = (f"cluster (quick): {first['n']} x 768 chunked {first['chunked']['seconds']:.1f} s vs exact "
                f"{first.get('exact_sklearn', {}).get('seconds', float('nan')):.1f} s; "
                f"{result['scale'][0]['n']} chunked {result['scale'][0]['chunked']['seconds']:.0f} s")
    if args.quick:  # a smoke run: no result file
        print(line)
        return
    write_result("cluster", result, line)


if __name__ == "__main__":
    main()
