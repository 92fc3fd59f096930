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


# The library's layers, from storage up to the evaluation recipe: a module may import its own layer
# or those below it (including lazy imports inside functions), never one above.
LAYERS = [
    ["asd", "asd.storage", "asd.commitlog", "asd.resources"],
    ["asd.layout", "asd.serving", "asd.frontend", "asd.data", "asd.data.audio", "asd.data.dcase", "asd.data.manifest",
     "asd.data.synthetic", "asd.data.realistic", "asd.metrics", "asd.knn", "asd.report", "asd.ward", "asd.models",
     "asd.models.encoder", "asd.models.cnn", "asd.models.modnet", "asd.models.heads"],
    ["asd.features", "asd.embeddings", "asd.models.embedders", "asd.split"],
    ["asd.featurize", "asd.loop", "asd.batches", "asd.checkpoints", "asd.faults", "asd.train"],
    ["asd.embed", "asd.pretrain", "asd.finetune", "asd.cluster"],
    ["asd.score"],
    ["asd.baselines", "asd.baselines.autoencoder", "asd.rescore"],
    ["asd.evaluate"],
]


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


def test_no_module_imports_a_layer_above_it():
    layer = {m: i for i, names in enumerate(LAYERS) for m in names}
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "asd").rglob("*.py")}
    assert set(modules) == set(layer), f"place every module in LAYERS: {sorted(set(modules) ^ set(layer))}"
    upward = [f"{m} (layer {layer[m]}) imports {d} (layer {layer[d]})"
              for m, p in sorted(modules.items()) for d in sorted(_asd_imports(p, m)) if layer[d] > layer[m]]
    assert not upward, upward
    # and no cycle among same-layer imports
    graph = {m: {d for d in _asd_imports(p, m) if layer[d] == layer[m]} for m, p in modules.items()}
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
    above = ("asd.featurize", "asd.score", "asd.rescore", "asd.evaluate", "asd.embed", "asd.knn")
    assert _run(["asd.pretrain", "asd.finetune"], absent=above) == "[]"
