"""FLOPs of one pre-training step with the student's front end shared by a clip's masked clones,
against running it once per clone (what the step did before): forward FLOPs counted by PyTorch's
``FlopCounterMode`` on the CPU, a step taken as the teacher's forward plus 3 x the student's
forward (forward and backward, the usual convention: the counter's own figure for the backward
of a grouped convolution ignores the groups, 16 x too high for the positional convolution). The
``tiny`` step is also timed on the CPU (median of ``--repeats`` steps, forward and backward).

    python -m benchmarks.pretrain_front_end [--clips 1]

Settings are the shipped configs': ``tiny`` as ``jobs/conf/pretrain/tiny.yaml`` (4 clones of 192
frames) and ``base`` at the EAT settings of ``jobs/conf/pretrain/base.yaml`` (16 clones of 1024
frames, a 768 x 6 decoder). FLOPs grow linearly with the clips of a batch, so one clip is enough.
Writes ``results/pretrain_front_end.{json,txt}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_result  # noqa: E402

SETTINGS = {  # name -> (PretrainConfig changes, crop frames), as the shipped configs
    "tiny": ({"model": "tiny", "clone_batch": 4, "top_k_layers": 2, "decoder_dim": 128, "decoder_layers": 2}, 192),
    "base": ({"model": "base", "clone_batch": 16, "top_k_layers": 12, "decoder_dim": 768, "decoder_layers": 6}, 1024),
}


def _setup(name: str, clips: int):
    from asd.stages.pretrain import Data2VecObjective, PretrainConfig, make_mask

    changes, frames = SETTINGS[name]
    pcfg = PretrainConfig(**changes)
    objective = Data2VecObjective(pcfg)
    torch.manual_seed(0)
    model = objective.build()
    teacher = objective.build().encoder.eval()
    cfg = objective.encoder_cfg
    fbank = torch.randn(clips, frames, cfg.num_mel_bins)
    grid = (frames // cfg.input_patch_size, cfg.num_mel_bins // cfg.input_patch_size)
    mask = make_mask(clips * pcfg.clone_batch, grid, pcfg.mask_ratio, pcfg.mask_type, pcfg.mask_block, "cpu")
    return pcfg, model, teacher, fbank, mask


def _student(model, fbank, mask, clones: int, shared: bool):
    return model(fbank, mask, clones=clones) if shared else model(fbank.repeat_interleave(clones, dim=0), mask)


def step_flops(name: str, clips: int, shared: bool) -> tuple[int, int]:
    """(teacher forward FLOPs, student forward FLOPs) of one step."""
    pcfg, model, teacher, fbank, mask = _setup(name, clips)
    counts = []
    for run in (lambda: teacher(fbank, return_all_layers=True),
                lambda: _student(model, fbank, mask, pcfg.clone_batch, shared)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            run()
        counts.append(int(counter.get_total_flops()))
    return counts[0], counts[1]


def step_seconds(name: str, clips: int, shared: bool, repeats: int) -> float:
    """Median CPU seconds of the student's forward and backward (the teacher is the same either way)."""
    pcfg, model, _, fbank, mask = _setup(name, clips)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        pred, utt = _student(model, fbank, mask, pcfg.clone_batch, shared)
        (pred.float().pow(2).mean() + utt.float().pow(2).mean()).backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=1)
    p.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--repeats", type=int, default=5, help="timed tiny steps per variant")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = {}
    for name in args.models:
        t0 = time.perf_counter()
        (t_old, s_old), (t_new, s_new) = step_flops(name, args.clips, False), step_flops(name, args.clips, True)
        old, new = t_old + 3 * s_old, t_new + 3 * s_new
        rows[name] = {"clips": args.clips, "clones": SETTINGS[name][0]["clone_batch"], "frames": SETTINGS[name][1],
                      "teacher_forward_flops": t_new, "student_forward_flops_per_clone_front_end": s_old,
                      "student_forward_flops_shared_front_end": s_new, "step_flops_per_clone_front_end": old,
                      "step_flops_shared_front_end": new, "saving": 1.0 - new / old}
        if name == "tiny":
            a, b = (step_seconds(name, 8, shared, args.repeats) for shared in (False, True))
            rows[name].update(cpu_student_step_s_per_clone_front_end=a, cpu_student_step_s_shared_front_end=b,
                              cpu_speedup=a / b, cpu_timing_clips=8)
        rows[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {old / 1e9:.1f} -> {new / 1e9:.1f} GFLOP per step of {args.clips} clip(s)", flush=True)
    line = "pre-training step FLOPs (teacher forward + 3 x student forward), front end shared by the clones vs once per clone: " + "; ".join(
        f"{n} {r['step_flops_shared_front_end'] / 1e9:.1f} vs {r['step_flops_per_clone_front_end'] / 1e9:.1f} GFLOP per clip "
        f"({100 * r['saving']:.1f} % fewer; {r['clones']} clones of {r['frames']} frames)" for n, r in rows.items())
    if "tiny" in rows:
        r = rows["tiny"]
        line += (f"; tiny student step on this CPU (8 clips) {r['cpu_student_step_s_shared_front_end']:.3f} vs "
                 f"{r['cpu_student_step_s_per_clone_front_end']:.3f} s ({r['cpu_speedup']:.2f}x)")
    write_result("pretrain_front_end", {"models": rows}, line)
    return rows


if __name__ == "__main__":
    main()
