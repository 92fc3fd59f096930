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
    above = ("asd.stages.featurize", "asd.stages.score", "asd.stages.rescore", "asd.recipes.evaluate", "asd.stages.pseudo_label", "ray", "soundfile")
    assert _run(["asd.training.fit", "asd.stores.features", "asd.stages.embed", "asd.models.encoder"], absent=above) == "[]"


def test_training_imports_without_ray_hydra_soundfile_or_s3fs():
    bare = ("ray", "hydra", "omegaconf", "soundfile", "s3fs")
    assert _run(["asd.training.fit", "asd.stages.pretrain", "asd.stages.finetune", "asd.stores.features"], blocked=bare) == "[]"


# The library's packages, from storage up to the recipes: a module may import its own package or those
# below it (lazy imports inside functions included), never one above; within a package, no cycle.
PACKAGES = [
    ["asd", "asd.io", "asd.resources"],  # URIs and atomic writes, the commit log, the run layout; cluster resources
    ["asd.data"],                        # DCASE names, decoding, the manifest, front ends, generated corpora
    ["asd.algorithms", "asd.reports", "asd.models"],  # kNN, thresholds, Ward; metrics, tables, plots; encoders
    ["asd.stores"],                      # the feature and embedding stores
    ["asd.training"],                    # the loop, batches, augmentations, Ray Train
    ["asd.stages"],                      # featurize, pretrain, embed, pseudo_label, finetune, score, rescore
    ["asd.baselines"],                   # the DCASE autoencoder
    ["asd.recipes"],                     # detectors as data, their runs, evaluation
]


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _asd_imports(path: Path, module: str) -> set[str]:
    """Every ``asd`` module ``path`` imports, at the top or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "asd")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "asd":
            for a in node.names:  # "from asd import storage" names a module; "from asd.x import f" names x
                sub = f"{node.module}.{a.name}"
                found.add(sub if (REPO / (sub.replace(".", "/") + ".py")).exists() else node.module)
    return found - {module}


def test_no_module_imports_a_package_above_it():
    layer = {pkg: i for i, names in enumerate(PACKAGES) for pkg in names}
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "asd").rglob("*.py")}
    unplaced = sorted({_package(m) for m in modules} - set(layer))
    assert not unplaced, f"place every package of asd/ in PACKAGES: {unplaced}"
    upward = [f"{m} ({_package(m)}) imports {d} ({_package(d)})"
              for m, p in sorted(modules.items()) for d in sorted(_asd_imports(p, m))
              if layer[_package(d)] > layer[_package(m)]]
    assert not upward, upward
    # and no cycle among the modules of one layer
    graph = {m: {d for d in _asd_imports(p, m) if layer[_package(d)] == layer[_package(m)] and d in modules}
             for m, p in modules.items()}
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen:
            return
        stack.append(m)
        for d in graph[m]:
            visit(d)
        stack.pop()
        seen.add(m)

    for m in graph:
        visit(m)


def test_training_stages_load_neither_scoring_rescoring_nor_featurization():
    above = ("asd.stages.featurize", "asd.stages.score", "asd.stages.rescore", "asd.recipes.evaluate", "asd.stages.embed", "asd.algorithms.knn")
    assert _run(["asd.stages.pretrain", "asd.stages.finetune"], absent=above) == "[]"
