"""The training and embedding layers import no stage above them, and run where only torch and
pyarrow are installed (a bare GPU image: no Ray, Hydra, soundfile or s3fs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCK = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
for m in {modules!r}:
    importlib.import_module(m)
print(sorted(m for m in sys.modules if m in {absent!r}))
"""


def _run(modules, blocked=(), absent=()) -> str:
    code = BLOCK.format(blocked=set(blocked), modules=list(modules), absent=set(absent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_training_and_embedding_load_no_stage_above_them():
    above = ("asd.featurize", "asd.score", "asd.rescore", "asd.evaluate", "asd.cluster", "ray", "soundfile")
    assert _run(["asd.train", "asd.features", "asd.embed", "asd.models.encoder"], absent=above) == "[]"


def test_training_imports_without_ray_hydra_soundfile_or_s3fs():
    bare = ("ray", "hydra", "omegaconf", "soundfile", "s3fs")
    assert _run(["asd.train", "asd.pretrain", "asd.finetune", "asd.features"], blocked=bare) == "[]"
