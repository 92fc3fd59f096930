"""benchmarks/accuracy.py's arithmetic: the served recipe's margin over the better baseline per seed."""

import pytest

from benchmarks import accuracy


def test_seed_table_takes_the_better_baseline_per_seed_and_the_median_margin():
    served = accuracy.SERVED
    rows = [{"seed": 0, "official_scores": {"ae_mse": 0.55, "logmel": 0.53, served: 0.60}},
            {"seed": 1, "official_scores": {"ae_mse": 0.61, "logmel": 0.59, served: 0.55}},
            {"seed": 2, "official_scores": {"ae_mse": 0.58, "logmel": 0.60, served: 0.61}}]
    methods = ["ae_mse", "logmel", served]
    table = accuracy._seed_table(rows, methods)
    assert [r["best_baseline"] for r in table["rows"]] == [0.55, 0.61, 0.60]
    assert [r["served_minus_best_baseline"] for r in table["rows"]] == pytest.approx([0.05, -0.06, 0.01])
    assert table["median_served_minus_best_baseline"] == pytest.approx(0.01)
    assert table["median"][served] == pytest.approx(0.60)
    line = accuracy._seed_line("x", table, methods)
    assert "+5.00/-6.00/+1.00 (median +1.00 points)" in line and f"{served} 60.00/55.00/61.00" in line


def test_seed_table_without_the_served_method_has_no_margin():
    rows = [{"seed": 0, "official_scores": {"ae_mse": 0.55, accuracy.SERVED: None}}]
    table = accuracy._seed_table(rows, ["ae_mse", accuracy.SERVED])
    assert table["rows"][0]["served_minus_best_baseline"] is None
    assert table["median_served_minus_best_baseline"] is None


def test_seed_plot_draws_one_bar_per_method_and_seed(tmp_path):
    import json

    import matplotlib.image as mpimg
    import numpy as np

    served = accuracy.SERVED
    rows = [{"seed": 0, "official_scores": {"ae_mse": 0.55, "logmel": 0.53, served: 0.60}},
            {"seed": 1, "official_scores": {"ae_mse": 0.61, "logmel": 0.59, served: 0.55}}]
    methods = ["ae_mse", "logmel", served]
    record = tmp_path / "seeds.json"
    record.write_text(json.dumps({"preset": "x", "methods": methods, "served": served,
                                  **accuracy._seed_table(rows, methods)}))
    png = accuracy.plot_seed_table(record)
    assert png == tmp_path / "seeds.png"
    img = mpimg.imread(png)
    assert img.shape[:2] == (round(3.6 * 120), round((2.2 + 1.6 * 2) * 120))
    # the default colour cycle's first three colours (one per method) are all drawn
    rgb = (img[..., :3] * 255).round().astype(int).reshape(-1, 3)
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert (np.abs(rgb - colour).sum(axis=1) <= 6).sum() > 200, colour


def test_gpu_check_runs_its_parts_at_toy_size_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py: pre-training (also with activation checkpointing), the attention
    kernels, kNN on the device, LoRA fine-tuning and embedding through the project's own code, one
    JSON line and one line of text; the DDP part needs two GPUs and says so. (torch.compile takes
    about 45 s on this CPU: tests/test_device.py covers it.)"""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--steps", "3",
                        "--variant-steps", "2", "--only", "pretrain", "pretrain_activation_checkpointing", "attention",
                        "knn", "finetune_lora", "embed", "ddp", "--out", str(out)], cwd=str(repo), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert line == json.loads(out.read_text()) and line["failed"] == [] and line["device"] == "cpu"
    parts = line["parts"]
    assert parts["pretrain"]["steps"] == 3 and parts["pretrain"]["flops_per_step"] > 0
    assert parts["finetune_lora"]["steps"] == 3 and parts["finetune_lora"]["final_loss"] > 0
    assert parts["embed"]["dim"] > 0 and parts["embed"]["clips_per_s"] > 0
    assert "skipped" in parts["ddp"] and "pretrain_compile" not in parts
    assert parts["pretrain_activation_checkpointing"]["steps"] == 2
    assert parts["pretrain_activation_checkpointing"]["activation_checkpointing"] is True
    assert isinstance(parts["attention"]["relative_bias"]["math"], float)  # the math kernel always runs
    assert parts["knn"]["ok"] is True
    assert out.with_suffix(".txt").read_text().startswith("gpu_check on cpu")


def test_gpu_check_knows_the_peaks_of_the_devices_it_names():
    from benchmarks.gpu_check import peak_flops

    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA L40") is None and peak_flops("NVIDIA A10G") is None  # unknown: no MFU, not a guess


def test_the_real_part_measures_the_margin_per_seed_and_trains_other_seeds():
    scores = {"ae_mse": 0.54, "ae_mahalanobis": 0.50, "logmel": 0.53, accuracy.SERVED: 0.60}
    assert accuracy._margin(scores) == pytest.approx(0.06)  # against the better of the three baselines
    assert accuracy._margin({**scores, accuracy.SERVED: None}) is None
    assert accuracy._spread([0.1, None, 0.3, 0.2]) == {"median": 0.2, "min": 0.1, "max": 0.3}
    assert accuracy.training_seed(0) == []  # the shipped seeds
    over = accuracy.training_seed(2)
    assert over[-1] == "ae.seed=13713" and over[0].startswith("recipe_overrides=[")
    assert "'models.cnn.train.seed=2'" in over[0] and "'models.mod.train.seed=2'" in over[0]
