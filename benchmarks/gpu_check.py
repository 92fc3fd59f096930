"""The GPU check: the training and embedding paths on one accelerator, in one short run, one JSON line.

    python -m benchmarks.gpu_check                 # on a GPU machine (about 3 minutes on one H100/H200)
    python -m benchmarks.gpu_check --device cpu    # the same code paths at toy size, on any machine

Runs where only torch and pyarrow are installed (a bare GPU image: no Ray, Hydra, soundfile or
s3fs; ``benchmarks/gpu_check.sh`` adds the ``gpu`` tests when pytest and Ray are there). Every
part goes through the project's own code, on random log-mel features held in memory:

1. ``pretrain``: the ``base`` encoder (``tiny`` on CPU) pre-trained through :func:`asd.training.loop.train_loop`
   (the loop Ray Train runs on each worker) at the EAT settings of ``jobs/conf/pretrain/base.yaml``
   (12 clips x 16 masked clones of 1024 frames per step), bf16 autocast and TF32 on CUDA; reports
   clips/s over the second half of the steps, peak memory and MFU (model FLOPs per step, counted
   by ``FlopCounterMode`` as the teacher's forward plus 3 x the student's forward, over the
   device's dense bf16 peak where known);
2. ``pretrain_activation_checkpointing`` and ``pretrain_compile``: the same pre-training, shorter,
   with ``TrainConfig.activation_checkpointing`` and ``TrainConfig.compile`` (compile time is in
   ``seconds``, not in the steady throughput);
3. ``attention``: ms per forward + backward of the whole encoder under each SDPA kernel alone
   (flash, efficient, cudnn, math) and PyTorch's own choice, with and without the relative bias;
4. ``knn``: the kNN scoring products on the device against numpy on the host (same distances);
5. ``finetune_lora``: attribute fine-tuning of that encoder with LoRA (rank 8) through the same loop;
6. ``embed``: the ``encoder`` embedder (what embedding actors run) on the device, clips/s;
7. ``ddp``: with two or more GPUs, ``torchrun`` with two NCCL processes of the pre-training loop
   (skipped on one GPU or on CPU).

Exit status 1 when a part fails; the JSON line says which and why.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# dense bf16 peak FLOP/s by device name (longest match first); unknown devices report no MFU
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(name: str) -> float | None:
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_BF16[key]
    return None


def feature_table(n_clips: int, frames: int, bins: int = 128, n_classes: int = 8, seed: int = 0) -> pa.Table:
    """Random log-mel feature rows in the feature store's columns (``asd.stores.features.MATRICES``)."""
    rng = np.random.default_rng(seed)
    fb = [(rng.standard_normal((frames, bins)) * 4 - 5).astype(np.float16).tobytes() for _ in range(n_clips)]
    return pa.table({
        "clip_id": [f"gpu_check/clip_{i:05d}.wav" for i in range(n_clips)],
        "split": ["train"] * n_clips,
        "machine_type": [f"type{i % n_classes}" for i in range(n_clips)],
        "fbank": pa.array(fb, pa.binary()),
        "fbank_dtype": ["float16"] * n_clips,
        "fbank_frames": pa.array([frames] * n_clips, pa.int32()),
        "num_mel_bins": pa.array([bins] * n_clips, pa.int32()),
    })


def _loop(objective, table: pa.Table, cfg, device: torch.device):
    from asd.training.batches import FeatureBatches, table_batches
    from asd.training.loop import cuda_precision, train_loop

    if device.type == "cuda":
        cuda_precision(cfg)
        torch.cuda.reset_peak_memory_stats(device)
    source = FeatureBatches(table_batches(table, cfg), cfg, columns=objective.columns, cache=True,
                            weights=getattr(objective, "sample_weights", None))
    res = train_loop(objective, source, cfg, device=device)
    out = {"steps": res.step, "seconds": round(res.seconds, 2), "clips_per_s": round(res.steady_samples_per_s, 2),
           "final_loss": res.final_loss}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return res, out


def step_flops(objective, clips: int, frames: int, device: torch.device) -> int:
    """Model FLOPs of one pre-training step: teacher forward + 3 x student forward (counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from asd.stages.pretrain import make_mask

    pcfg, enc = objective.pcfg, objective.encoder_cfg
    with torch.no_grad():
        model = objective.build().to(device)
        fbank = torch.randn(clips, frames, enc.num_mel_bins, device=device)
        grid = (frames // enc.input_patch_size, enc.num_mel_bins // enc.input_patch_size)
        mask = make_mask(clips * pcfg.clone_batch, grid, pcfg.mask_ratio, pcfg.mask_type, pcfg.mask_block, device)
        counts = []
        for run in (lambda: model.encoder(fbank, return_all_layers=True),
                    lambda: model(fbank, mask, clones=pcfg.clone_batch)):
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            counts.append(counter.get_total_flops())
    return int(counts[0] + 3 * counts[1])


def part_pretrain(args, device: torch.device, out_dir: str | None, steps: int | None = None, **options) -> dict:
    """Pre-training through the loop; ``options``: TrainConfig switches (``compile``,
    ``activation_checkpointing``). Writes the encoder to ``out_dir`` when given."""
    from asd.models.registry import save_checkpoint
    from asd.stages.pretrain import Data2VecObjective, PretrainConfig
    from asd.training.loop import TrainConfig

    if args.device == "cpu":
        pcfg = PretrainConfig(model="tiny", clone_batch=4, top_k_layers=2, decoder_dim=64, decoder_layers=1)
        cfg = TrainConfig(steps=steps or args.steps or 4, batch_size=2, crop_frames=192, warmup_steps=1, bf16=False)
    else:
        pcfg = PretrainConfig(model="base", clone_batch=16, top_k_layers=12, decoder_dim=768, decoder_layers=6,
                              ema_start=0.9998, ema_end=0.99999)
        cfg = TrainConfig(steps=steps or args.steps or 40, batch_size=12, crop_frames=1024, warmup_steps=5, bf16=True,
                          grad_clip=4.0)
    cfg = replace(cfg, log_every=max(1, cfg.steps // 4), checkpoint_every=10**9, **options)
    objective = Data2VecObjective(pcfg)
    table = feature_table(max(4 * cfg.batch_size, 16), cfg.crop_frames + 16)
    res, out = _loop(objective, table, cfg, device)
    flops = step_flops(objective, cfg.batch_size, cfg.crop_frames, device)
    out.update(model=pcfg.model, clips_per_step=cfg.batch_size, clones=pcfg.clone_batch, frames=cfg.crop_frames,
               bf16=bool(cfg.bf16 and device.type == "cuda"), flops_per_step=flops, **options)
    steps_per_s = res.steady_samples_per_s / cfg.batch_size if res.steady_samples_per_s else 0.0
    out["achieved_tflops"] = round(flops * steps_per_s / 1e12, 2)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out["mfu"] = round(flops * steps_per_s / peak, 4) if peak else None
    if out_dir is not None:
        ckpt = os.path.join(out_dir, "encoder.pt")
        save_checkpoint(objective.encoder(res.module), ckpt, meta={"stage": "gpu_check"})
        out["encoder"] = ckpt
    return out


def part_attention(args, device: torch.device) -> dict:
    """Which SDPA kernels the encoder's attention reaches, with and without BEATs' relative position
    bias: forward + backward of the whole encoder (``base``; ``tiny`` on CPU) in training mode under
    each backend alone, and under PyTorch's own choice (``default``); ms per pass, or why not."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from asd.models.encoder import AudioEncoder, get_config

    cpu = device.type == "cpu"
    clips, frames = (2, 192) if cpu else (16, 1024)
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if not cpu else nullcontext()
    out: dict = {"model": "tiny" if cpu else "base", "clips": clips, "frames": frames}
    for rel in (True, False):
        enc_cfg = replace(get_config("tiny" if cpu else "base"), relative_position_embedding=rel, gru_rel_pos=rel)
        torch.manual_seed(0)
        enc = AudioEncoder(enc_cfg).to(device).train()
        x = torch.randn(clips, frames, 128, device=device)
        row = {}
        for name, backend in backends.items():
            try:
                with sdpa_kernel([backend]) if backend is not None else nullcontext():
                    times = []
                    for _ in range(4):  # the first pass warms up
                        if not cpu:
                            torch.cuda.synchronize(device)
                        t0 = time.perf_counter()
                        with autocast:
                            loss = enc(x).float().pow(2).mean()
                        loss.backward()
                        if not cpu:
                            torch.cuda.synchronize(device)
                        times.append(time.perf_counter() - t0)
                        enc.zero_grad(set_to_none=True)
                row[name] = round(1000 * float(np.median(times[1:])), 1)
            except RuntimeError as e:
                row[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
        out["relative_bias" if rel else "no_relative_bias"] = row
        del enc
    return out


def part_knn(args, device: torch.device) -> dict:
    """kNN scoring products on the device (``asd.algorithms.knn`` torch path) against numpy on the host."""
    from asd.algorithms import knn

    cpu = device.type == "cpu"
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((2_000 if cpu else 100_000, 768), dtype=np.float32)
    q = rng.standard_normal((500 if cpu else 10_000, 768), dtype=np.float32)
    dev = "cpu:0" if cpu else "cuda"  # "cpu:0": the torch path, run on the host
    knn.knn_distance(q[:10], bank, k=1, device=dev)  # warm-up
    t0 = time.perf_counter()
    a = knn.knn_distance(q, bank, k=1, device=dev)
    t_dev = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = knn.knn_distance(q, bank, k=1, device="cpu")
    t_host = time.perf_counter() - t0
    return {"bank": bank.shape[0], "queries": q.shape[0], "device_s": round(t_dev, 3), "numpy_s": round(t_host, 3),
            "speedup": round(t_host / t_dev, 1), "max_abs_diff": float(np.abs(a - b).max()),
            "ok": bool(np.allclose(a, b, atol=1e-3))}


def part_finetune_lora(args, device: torch.device, encoder: str) -> dict:
    from asd.models.registry import load_checkpoint
    from asd.stages.finetune import AttributeObjective, FinetuneConfig
    from asd.training.loop import TrainConfig

    enc_cfg = load_checkpoint(encoder).cfg
    cpu = args.device == "cpu"
    cfg = TrainConfig(steps=args.steps or (4 if cpu else 30), batch_size=4 if cpu else 32,
                      crop_frames=192 if cpu else 1024, warmup_steps=1, bf16=not cpu, checkpoint_every=10**9,
                      log_every=5)
    table = feature_table(64, cfg.crop_frames + 16)
    ids = table.column("clip_id").to_pylist()
    classes = sorted(set(table.column("machine_type").to_pylist()))
    clip_class = {c: classes.index(t) for c, t in zip(ids, table.column("machine_type").to_pylist())}
    objective = AttributeObjective(FinetuneConfig(lora_rank=8, head="adacos"), enc_cfg, classes, clip_class,
                                   init_checkpoint=encoder)
    _, out = _loop(objective, table, cfg, device)
    out.update(lora_rank=8, clips_per_step=cfg.batch_size, frames=cfg.crop_frames)
    return out


def part_embed(args, device: torch.device, encoder: str) -> dict:
    from asd.models.embedders import make_embedder

    cpu = args.device == "cpu"
    n, frames = (8, 192) if cpu else (256, 1000)
    fbanks = list(np.random.default_rng(1).standard_normal((n, frames, 128), dtype=np.float32) * 4 - 5)
    emb = make_embedder("encoder", {"checkpoint": encoder, "device": device.type, "batch_size": 16 if cpu else 64})
    emb(fbanks[:2])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = emb(fbanks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"clips": n, "frames": frames, "dim": int(np.asarray(out).shape[1]), "clips_per_s": round(n / seconds, 2)}


def part_ddp(args, device: torch.device) -> dict:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"skipped": "needs two or more GPUs"}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), "full", "layer0", "layerdrop", "lora", "pretrain"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    return {"returncode": p.returncode, "configs": rows, "ok": p.returncode == 0 and all(r["ok"] for r in rows)}


def summary_line(result: dict) -> str:
    """One line of text from the JSON result (written beside it as ``.txt``)."""
    parts = result["parts"]

    def get(part: str, key: str):
        return parts.get(part, {}).get(key, "-")

    attn = parts.get("attention", {})
    return (f"gpu_check on {result['device']} (torch {result['torch']}): pre-training {get('pretrain', 'model')} "
            f"{get('pretrain', 'clips_per_s')} clips/s, MFU {get('pretrain', 'mfu')}, peak {get('pretrain', 'peak_memory_gib')} GiB; "
            f"activation checkpointing {get('pretrain_activation_checkpointing', 'clips_per_s')} clips/s, "
            f"{get('pretrain_activation_checkpointing', 'peak_memory_gib')} GiB; torch.compile "
            f"{get('pretrain_compile', 'clips_per_s')} clips/s, MFU {get('pretrain_compile', 'mfu')}; attention ms "
            f"(relative bias / none): {attn.get('relative_bias', {}).get('default', '-')} / "
            f"{attn.get('no_relative_bias', {}).get('default', '-')}; kNN on the device {get('knn', 'speedup')}x numpy; "
            f"LoRA {get('finetune_lora', 'clips_per_s')} clips/s; embed {get('embed', 'clips_per_s')} clips/s; "
            f"failed: {', '.join(result['failed']) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=None, help="training steps per part (default: 40 GPU / 4 CPU)")
    p.add_argument("--variant-steps", type=int, default=None,
                   help="steps of the activation-checkpointing and torch.compile pre-training runs (default: 24 GPU / 4 CPU)")
    p.add_argument("--only", nargs="*", default=None, help="run only these parts")
    p.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.variant_steps is None:
        args.variant_steps = 4 if device.type == "cpu" else 24
    result: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "gpus": torch.cuda.device_count(), "parts": {}, "failed": []}
    with tempfile.TemporaryDirectory() as tmp:
        encoder = None
        for name in ("pretrain", "pretrain_activation_checkpointing", "pretrain_compile", "attention", "knn",
                     "finetune_lora", "embed", "ddp"):
            if args.only is not None and name not in args.only and not (name == "pretrain" and encoder is None and
                                                                      {"finetune_lora", "embed"} & set(args.only)):
                continue
            t0 = time.perf_counter()
            print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
            try:
                if name == "pretrain":
                    out = part_pretrain(args, device, tmp)
                    encoder = out.pop("encoder")
                elif name == "pretrain_activation_checkpointing":
                    out = part_pretrain(args, device, None, steps=args.variant_steps, activation_checkpointing=True)
                elif name == "pretrain_compile":
                    out = part_pretrain(args, device, None, steps=args.variant_steps, compile=True)
                elif name == "attention":
                    out = part_attention(args, device)
                elif name == "knn":
                    out = part_knn(args, device)
                elif name == "ddp":
                    out = part_ddp(args, device)
                elif encoder is None:
                    out = {"skipped": "pre-training failed"}
                else:
                    out = (part_finetune_lora if name == "finetune_lora" else part_embed)(args, device, encoder)
            except Exception as e:  # noqa: BLE001 - one part's failure is reported, the others still run
                out = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            if "error" in out or out.get("ok") is False:
                result["failed"].append(name)
            out["wall_s"] = round(time.perf_counter() - t0, 1)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["parts"][name] = out
            print(f"[gpu_check] {name}: {json.dumps({k: v for k, v in out.items() if k != 'trace'})}",
                  file=sys.stderr, flush=True)
    line = json.dumps(result, sort_keys=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
        Path(args.out).with_suffix(".txt").write_text(summary_line(result) + "\n")
    print(line)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
