"""DDP correctness on CPU: two gloo processes (torchrun) train every supported configuration for a
few steps, each rank on its own batches and with its own random draws (layer drop, masks), and
must end with identical weights. Partial depth (``finetune.layer``) and layer drop used to fail on
the second step ("Expected to have finished reduction in the prior iteration")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["full", "layer0", "layer1_prenorm", "freeze1", "lora", "lora_layer1", "layerdrop", "subclusters",
           "members", "pretrain", "pretrain_layerdrop"]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tests" / "ddp_worker.py"), *CONFIGS],
                         env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path_factory.mktemp("ddp")))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["config"]: r for r in rows}


@pytest.mark.parametrize("config", CONFIGS)
def test_two_ranks_end_with_identical_weights(ddp_results, config):
    r = ddp_results.get(config)
    assert r is not None, f"{config}: no result (worker output: {sorted(ddp_results)})"
    assert r["error"] is None, r["error"]
    assert r["ok"] and r["max_abs_diff"] == 0.0, r


def test_partial_depth_freezes_exactly_the_blocks_it_never_runs():
    from dataclasses import replace

    from asd.models.attribute import AttributeModel
    from asd.models.encoder import CONFIGS as ENCODERS
    from asd.stages.finetune import FinetuneConfig

    enc = replace(ENCODERS["tiny"], encoder_layers=3)
    full = AttributeModel(enc, 4, FinetuneConfig())
    part = AttributeModel(enc, 4, FinetuneConfig(layer=0))
    frozen = {n for n, p in part.named_parameters() if not p.requires_grad}
    assert all(p.requires_grad for p in full.parameters())
    assert frozen and all(n.startswith(("encoder.encoder.layers.1.", "encoder.encoder.layers.2.")) for n in frozen)
    assert {n for n, _ in part.named_parameters() if n.startswith("encoder.encoder.layers.1.")} <= frozen
    pre = AttributeModel(replace(enc, layer_norm_first=True, deep_norm=False), 4, FinetuneConfig(layer=-1))
    assert {n for n, p in pre.named_parameters() if not p.requires_grad} == {
        "encoder.encoder.layer_norm.weight", "encoder.encoder.layer_norm.bias"}


def test_tf32_setting_reaches_torch():
    import torch

    from asd.training.loop import TrainConfig, cuda_precision

    before = torch.get_float32_matmul_precision()
    try:
        cuda_precision(TrainConfig(tf32=True))
        assert torch.get_float32_matmul_precision() == "high"
        cuda_precision(TrainConfig(tf32=False))
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
