"""Why does (or doesn't) fine-tuning on pseudo labels beat the pre-trained encoder? A sweep.

    python benchmarks/finetune_sweep.py --root outputs/default      # after: python -m jobs.pipeline

Reuses a finished pipeline root (features, ``models/pretrain``, the ``finetuned`` recipe's labels,
the ``pretrained`` scores) and fine-tunes the same pre-trained encoder under several settings, one
factor at a time from the ``finetuned`` recipe's (``jobs/conf/finetune/transformer.yaml``); each variant is
embedded and scored exactly like the pipeline does (kNN, k=1). Writes
``results/finetune_sweep.json`` with the official score (and AUC-s/AUC-t/pAUC) of every variant
next to the pre-trained encoder's, and the final training accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from asd.io import layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_result  # noqa: E402

VARIANTS: dict[str, dict] = {
    "default": {},
    "steps_400": {"train": {"steps": 400}},
    "no_balance": {"balance": "none"},
    "balance_domain": {"balance": "domain"},
    "lr_1e-4": {"train": {"lr": 1e-4}},
    "arcface": {"head": "arcface", "scale": 16.0, "margin": 0.2},
    "subcluster_adacos_4": {"subclusters": 4},
    "lora_r4": {"lora_rank": 4, "train": {"lr": 2e-3}},
    "freeze_1_of_2": {"freeze_layers": 1},
    "no_aug": {"time_masks": 0, "freq_masks": 0, "mixup_prob": 0.0},
}
# also "untrained": the tiny encoder at its initial weights (what pre-training started from)


def _means(m: dict) -> dict:
    """Mean AUC-s, AUC-t and pAUC over the sections (NaN-free ones)."""
    out = {}
    for k in ("auc_source", "auc_target", "pauc"):
        vals = [x[k] for x in m["sections"] if x.get(k) is not None and x[k] == x[k]]
        out[k] = round(sum(vals) / len(vals), 4) if vals else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="outputs/ablation")
    p.add_argument("--only", nargs="*", help="variant names (default: all)")
    a = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.data import DataContext

    from asd.io import storage
    from asd.io.layout import embeddings_dir
    from asd.stages.embed import EmbedConfig, embed
    from asd.stages.finetune import FinetuneConfig, finetune
    from asd.stages.score import ScoreConfig, score
    from asd.training.loop import TrainConfig

    root = os.path.abspath(a.root)
    base = json.loads((Path(root) / "scores" / "pretrained" / "metrics.json").read_text())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    # the pipeline's default fine-tuning settings
    from dataclasses import asdict

    from jobs.common import compose_config, recipe_from_config

    recipe = recipe_from_config(compose_config("finetune", [f"root={root}", "recipe=finetuned"]).recipe)
    fcfg0, tcfg0 = recipe.models["finetune"].finetune, recipe.models["finetune"].train
    conf = {**asdict(fcfg0), "labels": layout.labels_dir(root, recipe.labels.tag_name()),
            "init_checkpoint": layout.encoder_uri(root, recipe.pretrain.pretrain.tag)}
    train0 = {k: v for k, v in asdict(tcfg0).items() if k not in ("name", "storage_path")}
    rows = {}
    if not a.only or "untrained" in a.only:
        # the pre-trained encoder's own starting point (pretrain's seed), for the #6 comparison
        import torch

        from asd.models.registry import save_checkpoint
        from asd.stages.pretrain import Data2VecObjective

        pcfg, ptrain = recipe.pretrain.pretrain, recipe.pretrain.train
        torch.manual_seed(ptrain.seed)
        enc = Data2VecObjective(pcfg).build().encoder
        uri = save_checkpoint(enc, storage.join(root, "models", "sweep_untrained", "encoder.pt"))
        embed(root, "sweep_untrained", EmbedConfig(embedder="encoder", params={"checkpoint": uri}, num_actors=2,
                                                   num_cpus=0.5, progress=False))
        sc = score(embeddings_dir(root, "sweep_untrained"), layout.scores_dir(root, "sweep_untrained"),
                   ScoreConfig(plots=False, progress=False), title="untrained encoder")
        rows["untrained_encoder"] = {"change": "no pre-training, no fine-tuning", "official_score": sc.official_score,
                                     "mean": _means(sc.metrics)}
        print("untrained", json.dumps(rows["untrained_encoder"]), flush=True)
        for sub in ("models", "embeddings", "scores"):
            storage.remove(storage.join(root, sub, "sweep_untrained"))
    for name, change in VARIANTS.items():
        if a.only and name not in a.only:
            continue
        change = dict(change)
        train = {**train0, **change.pop("train", {}), "name": f"sweep_{name}", "resume": False}
        fcfg = FinetuneConfig(**{**conf, **change, "tag": f"sweep_{name}"})
        t0 = time.perf_counter()
        res = finetune(root, root, fcfg, TrainConfig(**{**train, "splits": tuple(train["splits"])}))
        embed(root, f"sweep_{name}", EmbedConfig(embedder="encoder", params={"checkpoint": res.encoder},
                                                 num_actors=2, num_cpus=0.5, progress=False))
        sc = score(embeddings_dir(root, f"sweep_{name}"), layout.scores_dir(root, f"sweep_{name}"),
                   ScoreConfig(plots=False, progress=False), title=f"sweep {name}")
        m = sc.metrics
        rows[name] = {"change": VARIANTS[name], "official_score": m["official_score"],
                      "mean": _means(m),
                      "final_accuracy": res.final_accuracy, "final_loss": res.final_loss,
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(name, json.dumps(rows[name]), flush=True)
        for sub in ("models", "embeddings", "scores", "checkpoints"):
            storage.remove(storage.join(root, sub, f"sweep_{name}"))
    best = max(rows, key=lambda n: rows[n]["official_score"])
    line = (f"fine-tuning sweep on {Path(root).name}: pre-trained {100 * base['official_score']:.2f} %; "
            + "; ".join(f"{n} {100 * r['official_score']:.2f} %" for n, r in rows.items())
            + f" (best {best})")
    write_result("finetune_sweep", {"root": root, "pretrained": base["official_score"], "variants": rows}, line)


if __name__ == "__main__":
    main()
