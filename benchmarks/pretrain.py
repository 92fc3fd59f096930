"""Pre-training throughput (Ray Train, CPU and GPU) and what pre-training buys the frozen embedding.

    python benchmarks/pretrain.py                 # everything below (CPU part about 5 minutes on 2 cores)
    python benchmarks/pretrain.py --no-compare    # throughput only
    python benchmarks/pretrain.py --gpu-dry-run   # the GPU measurement's code path, on CPU with tiny (checks only)

On a generated default corpus (``jobs.make_corpus`` defaults: 4 types x 44 training clips of 2 s),
featurized once into a temporary root, each measurement in a fresh process:

* **CPU scaling**: ``asd.training.fit.fit`` with the data2vec 2.0 objective, tiny and base encoders,
  1 worker (1 CPU) and 2 workers (0.5 CPU each), one torch thread per worker, DDP over gloo.
  Throughput is the steady state (second half of the steps, clips/s; each clip is seen by the
  student ``clone_batch`` times), summed over workers; ``scaling`` = 2 workers / 1 worker
  (ideal 2.0 on 2 cores; Ray Data and the controller share the same cores).
* **CUDA** (when a GPU is present; ``--gpu-only`` runs only this): base, bf16 autocast, one GPU,
  EAT-like batch (12 clips of 1024 frames x 16 masked clones) through ``asd.training.fit.fit`` (Ray
  Train, one worker, the path a cluster runs): clips/s, the worker's peak GPU memory, model FLOPs
  per step (the teacher's forward plus 3 x the student's, front end once per clip, counted with
  ``torch.utils.flop_counter``) and MFU against the card's dense bf16 peak
  (``benchmarks.gpu_check.peak_flops``: unknown cards report none rather than a guess). The
  front-end saving per step is ``benchmarks/pretrain_front_end.py``'s claim.
* **Side by side** (``--no-compare`` skips it): the tiny encoder pre-trained with
  ``jobs/conf/pretrain/tiny.yaml`` (``--compare-steps``, default 600) vs the same encoder
  untrained (the same initial weights), on a generated corpus of its own (``--compare-corpus``:
  ``large`` = 4 types x 210 training and 200 test clips, the default; ``default`` = the
  44-clip demo corpus, whose 10 + 10 test clips per domain make differences of a few points
  noise). Each is embedded with the ``encoder`` embedder, last block pooled two ways (``mean``
  over all patches, ``freq_meanstd`` per frequency band) and scored with the default kNN;
  official DCASE score (harmonic mean of AUCs and pAUCs) of each, and of the log-mel
  statistics baseline for reference.

Writes ``results/pretrain.json`` and ``results/pretrain.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from asd.io import layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import peak_rss_mb, run_child, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CPU_CASES = {  # model -> (steps, batch per worker, clone_batch, decoder dim, decoder layers, top-k)
    "tiny": (30, 16, 4, 128, 2, 2),
    "base": (6, 2, 2, 384, 2, 8),
}



def _env() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")


def _ray(num_cpus: int | None = None) -> None:
    import ray

    # always a fresh local instance (never attach to a cluster that happens to run here)
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


# --compare-corpus: the generated corpus of the side-by-side comparison
COMPARE_CORPORA = {
    "default": {},  # jobs.make_corpus defaults: 4 types x 44 training clips, 10 + 10 test clips per domain
    "large": {"n_train_source": 200, "n_train_target": 10, "n_test_per_domain": 100},  # the README's larger corpus
}


def prepare(root: str, corpus: str = "default") -> dict:
    """Generate a corpus (:data:`COMPARE_CORPORA`) and featurize it (once per root)."""
    from asd.data.synthetic import default_spec, make_corpus
    from asd.stages.featurize import FeaturizeConfig, featurize
    from asd.stores.features import committed_files

    if committed_files(root):
        return {"root": root, "skipped": True}
    info = make_corpus(default_spec(**COMPARE_CORPORA[corpus]), os.path.join(root, "corpus"),
                       workers=os.cpu_count() or 1, progress=False)
    _ray()
    res = featurize(os.path.join(root, "corpus"), root, FeaturizeConfig(progress=False))
    return {"root": root, "clips": info.n_clips, "featurized": res.n_featurized}


def cpu_run(root: str, model: str, workers: int) -> dict:
    from asd.stages.pretrain import Data2VecObjective, PretrainConfig
    from asd.training.fit import fit
    from asd.training.loop import TrainConfig

    steps, batch, clone, ddim, dlayers, topk = CPU_CASES[model]
    _ray()
    pcfg = PretrainConfig(model=model, clone_batch=clone, decoder_dim=ddim, decoder_layers=dlayers, top_k_layers=topk)
    tcfg = TrainConfig(steps=steps, batch_size=batch, warmup_steps=1, crop_frames=192, num_workers=workers,
                       cpus_per_worker=1.0 if workers == 1 else 0.5, torch_threads=1, checkpoint_every=10**6,
                       log_every=max(1, steps // 4), storage_path=os.path.join(root, "bench_ckpt"),
                       name=f"{model}-{workers}w", resume=False)
    res = fit(Data2VecObjective(pcfg), root, tcfg)
    return {"model": model, "workers": workers, "steps": res.step, "batch_per_worker": batch, "clone_batch": clone,
            "crop_frames": tcfg.crop_frames, "clips_per_s": res.steady_samples_per_s,
            "clips_per_s_per_worker": [w["steady_samples_per_s"] for w in res.workers],
            "clips_per_s_incl_startup": res.samples_per_s, "fit_seconds": res.seconds,
            "identical_weights": len({w["param_checksum"] for w in res.workers}) == 1,
            "final_loss": res.final_loss}


def gpu_run(root: str, dry_run: bool = False) -> dict:
    """Base with bf16 on one GPU through ``asd.training.fit.fit`` (Ray Train, one worker, NCCL); a dry run
    is tiny on the CPU through the same call. Model FLOPs per step: the teacher's forward plus 3 x
    the student's forward (front end once per clip), counted with ``FlopCounterMode`` on full
    batches (``benchmarks.gpu_check.step_flops``); MFU against the card's dense bf16 peak."""
    import torch

    from asd.stages.pretrain import Data2VecObjective, PretrainConfig
    from asd.training.fit import fit
    from asd.training.loop import TrainConfig
    from benchmarks.gpu_check import peak_flops, step_flops

    _ray()
    common = dict(checkpoint_every=10**6, num_workers=1, storage_path=os.path.join(root, "bench_ckpt"), resume=False)
    if dry_run:
        pcfg = PretrainConfig(model="tiny", clone_batch=2, decoder_dim=64, decoder_layers=1, top_k_layers=2)
        tcfg = TrainConfig(steps=4, batch_size=4, crop_frames=256, warmup_steps=1, log_every=2, cpus_per_worker=1,
                           name="gpu-dry", **common)
    else:  # EAT-like recipe: 12 clips x 16 clones of 10 s crops, decoder 768 x 6, top 12 layers
        pcfg = PretrainConfig(model="base", clone_batch=16, decoder_dim=768, decoder_layers=6, top_k_layers=12,
                              ema_start=0.9998, ema_end=0.99999)
        tcfg = TrainConfig(steps=40, batch_size=12, crop_frames=1024, warmup_steps=5, log_every=10, bf16=True,
                           grad_clip=4.0, use_gpu=True, cpus_per_worker=4, name="gpu", **common)
    obj = Data2VecObjective(pcfg)
    res = fit(obj, root, tcfg)
    worker = res.workers[0]
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    flops_per_step = step_flops(obj, tcfg.batch_size, tcfg.crop_frames, device)  # the worker has finished
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    steps_per_s = res.steady_samples_per_s / tcfg.batch_size
    peak = peak_flops(name) if device.type == "cuda" else None
    return {
        "device": name, "worker_device": worker.get("device"), "model": pcfg.model, "bf16": device.type == "cuda",
        "through": "asd.training.fit.fit (Ray Train, 1 worker)", "steps": res.step, "batch": tcfg.batch_size,
        "clone_batch": pcfg.clone_batch, "crop_frames": tcfg.crop_frames,
        "clips_per_s": res.steady_samples_per_s, "steps_per_s": steps_per_s,
        "model_flops_per_step": flops_per_step, "achieved_tflops": flops_per_step * steps_per_s / 1e12,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "mfu": flops_per_step * steps_per_s / peak if peak else None,
        "gpu_peak_memory_gib": worker.get("peak_memory_gib"), "fit_seconds": res.seconds,
        "checkpoint_seconds": worker.get("checkpoint_seconds"),
        "final_loss": res.final_loss,
    }


COMPARE_POOLS = ("mean", "freq_meanstd")


def compare_tag(name: str, pool: str) -> str:
    """Result key (and embeddings tag) of ``name`` ("pretrained"/"untrained") pooled ``pool``."""
    return name if pool == "mean" else f"{name}_{pool}"


def compare(root: str, steps: int | None = None) -> dict:
    """Official score: tiny pre-trained with the job's tiny config (``steps`` overrides its step
    count) vs the same encoder untrained, each pooled every way in :data:`COMPARE_POOLS`."""
    import torch

    import asd.models.embedders  # noqa: F401  (registers "encoder")
    from asd.models.registry import save_checkpoint
    from asd.stages.embed import EmbedConfig, embed
    from asd.stages.pretrain import Data2VecObjective, pretrain
    from asd.stages.score import ScoreConfig, score
    from jobs.common import compose_config, recipe_from_config

    _ray()
    overrides = [f"root={root}", "recipe=pretrained", "recipe.pretrain.train.resume=false"] + (
        [f"recipe.pretrain.train.steps={steps}"] if steps else [])
    pre = recipe_from_config(compose_config("pretrain", overrides).recipe).pretrain
    pcfg, tcfg = pre.pretrain, pre.train
    t0 = time.perf_counter()
    res = pretrain(root, root, pcfg, tcfg)
    pretrain_s = time.perf_counter() - t0
    torch.manual_seed(tcfg.seed)  # the initial weights train_loop starts from
    untrained = Data2VecObjective(pcfg).build().encoder
    untrained_uri = save_checkpoint(untrained, os.path.join(root, "models", "untrained", "encoder.pt"))
    out = {"pretrain_seconds": pretrain_s, "pretrain_steps": res.steps, "pretrain_final_loss": res.final_loss,
           "pretrain_clips_per_s": res.samples_per_s}
    runs = [(compare_tag(name, pool), {"checkpoint": ck, "pool": pool})
            for pool in COMPARE_POOLS for name, ck in (("untrained", untrained_uri), ("pretrained", res.encoder))]
    for tag, params in runs + [("logmel", None)]:
        cfg = EmbedConfig(embedder="encoder", params=params, progress=False) if params else EmbedConfig(progress=False)
        e = embed(root, tag, cfg)
        s = score(e.embeddings, layout.scores_dir(root, tag), ScoreConfig(progress=False, plots=False))
        out[tag] = {"official_score": s.official_score, "per_type": s.metrics.get("per_type") if s.metrics else None,
                    "dim": e.dim}
    return out


def _gpu_line(g: dict) -> str:
    mfu = f", MFU {g['mfu']:.1%}" if g.get("mfu") is not None else ""
    mem = f", {g['gpu_peak_memory_gib']:.1f} GiB" if g.get("gpu_peak_memory_gib") is not None else ""
    return (f"{g['model']} bf16 {g['clips_per_s']:.1f} clips/s x{g['clone_batch']} clones{mem}, "
            f"{g['achieved_tflops']:.0f} TFLOP/s{mfu} (Ray Train, 1 worker)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help="work folder (default: a temporary one, removed afterwards)")
    p.add_argument("--no-compare", action="store_true", help="skip the pre-trained vs untrained score comparison")
    p.add_argument("--gpu-dry-run", action="store_true", help="run the GPU measurement on CPU with tiny (a check)")
    p.add_argument("--gpu-only", action="store_true",
                   help="only the GPU measurement: results/pretrain_gpu.{json,txt}")
    p.add_argument("--compare-corpus", choices=sorted(COMPARE_CORPORA), default="large",
                   help="generated corpus of the side-by-side comparison (default: large)")
    p.add_argument("--compare-steps", type=int, default=600,
                   help="pre-training steps of the comparison (jobs/conf/pretrain/tiny.yaml has 120)")
    a = p.parse_args()
    _env()
    if a.child:
        kind, root = a.child[0], a.child[1]
        if kind == "prepare":
            out = prepare(root, a.child[2] if len(a.child) > 2 else "default")
        elif kind == "cpu":
            out = cpu_run(root, a.child[2], int(a.child[3]))
        elif kind == "gpu":
            out = gpu_run(root, dry_run=len(a.child) > 2 and a.child[2] == "dry")
        elif kind == "compare":
            out = compare(root, int(a.child[2]) if len(a.child) > 2 else None)
        else:
            raise SystemExit(f"unknown child {kind}")
        out["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(out, default=str))
        return

    me = os.path.abspath(__file__)
    root = a.root or tempfile.mkdtemp(prefix="asd-bench-pretrain-")
    try:
        run_child([me, "--child", "prepare", root, "default"])
        if a.gpu_dry_run:
            print(json.dumps(run_child([me, "--child", "gpu", root, "dry"]), indent=2))
            return
        if a.gpu_only:
            g = run_child([me, "--child", "gpu", root])
            write_result("pretrain_gpu", g, f"pretrain through fit on {g['device']}: {_gpu_line(g)}")
            return
        t0 = time.perf_counter()
        cpu, parts = {}, []
        for model in CPU_CASES:
            for workers in (1, 2):
                r = run_child([me, "--child", "cpu", root, model, str(workers)])
                cpu[f"{model}_{workers}w"] = r
                print(f"{model} x{workers}: {r['clips_per_s']:.2f} clips/s "
                      f"(per worker {[round(x, 2) for x in r['clips_per_s_per_worker']]})", flush=True)
            one, two = cpu[f"{model}_1w"]["clips_per_s"], cpu[f"{model}_2w"]["clips_per_s"]
            cpu[f"{model}_scaling"] = two / one if one else None
            parts.append(f"{model} {one:.1f} -> {two:.1f} clips/s with 2 workers ({two / one:.2f}x)")
        cpu_seconds = time.perf_counter() - t0
        result: dict = {"cpu": cpu, "cpu_seconds": cpu_seconds, "cpu_cases": CPU_CASES}
        gpu_line = "no CUDA GPU"
        import torch

        if torch.cuda.is_available():
            g = run_child([me, "--child", "gpu", root])
            result["gpu"] = g
            gpu_line = f"{g['device']} {_gpu_line(g)}"
            print(gpu_line, flush=True)
        cmp_line = ""
        if not a.no_compare:
            croot = root if a.compare_corpus == "default" else os.path.join(root, f"compare-{a.compare_corpus}")
            run_child([me, "--child", "prepare", croot, a.compare_corpus])
            c = run_child([me, "--child", "compare", croot, str(a.compare_steps)])
            c["corpus"] = {"name": a.compare_corpus, **COMPARE_CORPORA[a.compare_corpus]}
            result["compare"] = c
            pools = "; ".join(f"{pool}-pooled {c[compare_tag('pretrained', pool)]['official_score']:.3f} vs "
                              f"{c[compare_tag('untrained', pool)]['official_score']:.3f}" for pool in COMPARE_POOLS)
            cmp_line = (f"; official score, tiny pre-trained vs untrained on the {a.compare_corpus} generated "
                        f"corpus: {pools} (log-mel stats {c['logmel']['official_score']:.3f}; pre-training "
                        f"{c['pretrain_steps']} steps in {c['pretrain_seconds']:.0f} s)")
            print(cmp_line, flush=True)
        line = (f"pretrain (data2vec2, Ray Train DDP on {os.cpu_count()} CPU cores, steady clips/s): "
                + "; ".join(parts) + f"; GPU: {gpu_line}" + cmp_line)
        write_result("pretrain", result, line)
    finally:
        if a.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
