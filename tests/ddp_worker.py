"""Run by tests/test_ddp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): a few DDP steps of
each named training configuration, each rank on its own random batches, then one JSON line per
configuration from rank 0: ``{"config", "ok", "error", "max_abs_diff"}``, where ``max_abs_diff`` is
the largest difference between any parameter on rank 0 and the same parameter on rank 1.

    torchrun --nproc_per_node 2 tests/ddp_worker.py layer0 freeze1 lora layerdrop subclusters members pretrain
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from asd.models.encoder import CONFIGS as ENCODERS
from asd.stages.finetune import AttributeObjective, FinetuneConfig
from asd.training.loop import ObjectiveBase

N_CLASSES, STEPS, BATCH, FRAMES = 4, 3, 4, 64
TINY = replace(ENCODERS["tiny"], encoder_layers=3, relative_position_embedding=True, gru_rel_pos=True,
               num_buckets=32, max_distance=64)

FINETUNE = {  # name -> (FinetuneConfig changes, encoder changes)
    "full": ({}, {}),
    "layer0": ({"layer": 0}, {}),
    "layer1_prenorm": ({"layer": 1}, {"layer_norm_first": True, "deep_norm": False}),
    "freeze1": ({"freeze_layers": 1}, {}),
    "lora": ({"lora_rank": 2}, {}),
    "lora_layer1": ({"lora_rank": 2, "layer": 1}, {}),
    "layerdrop": ({}, {"encoder_layerdrop": 0.5}),
    "subclusters": ({"subclusters": 3, "head": "adacos"}, {}),
    "members": ({"members": 2}, {}),
}


def _objective(name: str) -> tuple[ObjectiveBase, dict]:
    if name.startswith("pretrain"):
        from asd.stages.pretrain import Data2VecObjective, PretrainConfig

        enc = replace(TINY, encoder_layerdrop=0.5 if name == "pretrain_layerdrop" else 0.0)
        pcfg = PretrainConfig(clone_batch=2, decoder_dim=32, decoder_layers=1, decoder_groups=8, mask_ratio=0.5)
        return Data2VecObjective(pcfg, enc), {}
    fchanges, echanges = FINETUNE[name]
    fcfg = FinetuneConfig(mixup_prob=0.0, **fchanges)
    classes = [f"c{i}" for i in range(N_CLASSES)]
    clip_class = {f"clip{i}": i % N_CLASSES for i in range(64)}
    return AttributeObjective(fcfg, replace(TINY, **echanges), classes, clip_class), clip_class


def _batch(step: int, rank: int, members: int) -> dict:
    g = torch.Generator().manual_seed(1000 * rank + step)
    n = BATCH * members
    ids = torch.randint(0, 64, (n,), generator=g).tolist()
    return {"fbank": torch.randn(n, FRAMES, TINY.num_mel_bins, generator=g), "clip_id": [f"clip{i}" for i in ids]}


def run(name: str, rank: int, world: int) -> dict:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    objective, _ = _objective(name)
    module = objective.build()
    objective.setup(module, torch.device("cpu"))
    model = DistributedDataParallel(module, find_unused_parameters=bool(objective.find_unused_parameters))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    members = getattr(getattr(objective, "fcfg", None), "members", 1)
    torch.manual_seed(100 + rank)  # per-rank randomness (layer drop, masks), as on a real cluster
    for step in range(STEPS):
        loss, _ = objective.step(model, _batch(step, rank, members), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        objective.after_optimizer_step(module, step + 1, STEPS)
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
    return {"config": name, "ok": diff == 0.0, "error": None, "max_abs_diff": diff}


def main(names: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for name in names:
        try:
            out = run(name, rank, world)
        except Exception as e:  # noqa: BLE001 - reported per configuration, the others still run
            out = {"config": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}", "max_abs_diff": None}
            dist.barrier()
        if rank == 0:
            print(json.dumps(out), flush=True)
    # Both ranks leave together: a rank that tears gloo down while its peer still holds the
    # connection aborts the peer ("terminate called without an active exception", exit -6).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
