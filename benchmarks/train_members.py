"""Train more members of the served recipe's encoders into an existing ``jobs.evaluate`` root.

    python -m benchmarks.train_members <evaluate root> --model cnn|mod --seeds 1 2 [overrides...]

Each member is the evaluate run's own ``cnn`` or ``mod`` fine-tune (same labels, same training
view, same settings) with another training seed; it is embedded into
``<root>/embeddings/<prefix>-<model>-<seed>`` (prefix ``member`` unless ``--prefix``; an override
``<model>.finetune.members=N`` trains N side by side in that run, embedded as ``...-<seed>-m<i>``).
``--n-clusters K`` trains on Ward labels of K clusters per type instead of the run's own.
``benchmarks.score_variants`` then scores any combination of members. Development seeds only: this
is how the ensemble size of the served recipe was chosen, never on the seeds the accuracy record
reports.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from asd import storage


def main(argv: list[str] | None = None) -> list[str]:
    import ray

    from asd.embed import EmbedConfig, embed
    from asd.finetune import finetune, member_tag
    from jobs.common import compose_config
    from jobs.evaluate import evaluate_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root")
    p.add_argument("--model", choices=("cnn", "mod"), required=True)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--n-clusters", type=int, default=None,
                   help="train on Ward labels of this many clusters per type (labels/<prefix>-pseudo) "
                        "instead of the run's own pseudo labels")
    p.add_argument("--prefix", default="member", help="tags are <prefix>-<model>-<seed> (a variant's own prefix)")
    p.add_argument("overrides", nargs="*", help="jobs.evaluate overrides (e.g. cnn.finetune.train.steps=300)")
    args = p.parse_intermixed_args(argv)

    cfg = compose_config("evaluate", [f"root={args.root}", *args.overrides])
    ecfg = evaluate_config(cfg)
    mc = getattr(ecfg, args.model)
    labels = storage.join(args.root, "labels", f"{ecfg.cnn.tag}-pseudo")
    view = storage.join(args.root, "evaluate", "train_view")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    if args.n_clusters is not None:
        from asd.cluster import pseudo_label
        from asd.layout import embeddings_dir

        labels = storage.join(args.root, "labels", f"{args.prefix}-pseudo")
        manifest = storage.join(args.root, "manifest", "manifest.parquet")
        pl = pseudo_label(embeddings_dir(view, f"{ecfg.logmel.tag}-train"), labels,
                          replace(ecfg.cnn.cluster, n_clusters=args.n_clusters, label_source="pseudo"),
                          manifest_uri=manifest if storage.exists(manifest) else None)
        print(f"labels {labels}: {args.n_clusters} clusters per type, quality {pl.quality}", flush=True)
    storage.require_published(labels)
    out = []
    for seed in args.seeds:
        tag = f"{args.prefix}-{args.model}-{seed}"
        res = finetune(view, args.root, replace(mc.finetune, tag=tag, embed_tag=tag, labels=labels, set_current=False),
                       replace(mc.finetune_train, name=tag, seed=seed, resume=False))
        for i, encoder in enumerate(res.encoders):  # finetune.members > 1: <tag>-m<i> for member i > 0
            e = embed(args.root, member_tag(tag, i),
                      EmbedConfig(embedder="encoder", params={**(mc.embed.params or {}), "checkpoint": encoder},
                                  num_actors=2, num_cpus=0.5, progress=False))
            out.append(e.embeddings)
        print(f"{tag}: {res.seconds:.0f} s training, embeddings {out[-len(res.encoders):]}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
