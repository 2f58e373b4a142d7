"""The package's layers: a module imports only modules of lower layers — imports inside functions count.

`LAYERS` is the one declaration of the order (lowest first); modules of one layer do not import each other.
A new module must be placed here, or `test_every_module_has_a_layer` fails."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "opd"

LAYERS = [
    ["config"],                                   # schema, run directories, CLI plumbing
    ["stats", "samples"],                         # seeds, bootstrap/Wilson intervals, the Markdown-table writer; the samples contract
    ["prompts"],                                  # the prompt corpus and splits
    ["gmm", "text"],                              # the closed-form GMM teacher (a `model.teacher` spec); SD3's text side
    ["models"],                                   # text encoders, architectures, FlowModel, ModelPair, load_models
    ["hub", "rollout", "metrics"],                # hub replica; the sampler and teacher grading; image-quality metrics
    ["losses", "teacher_dataset"],                # per-step KL and RewardComputer; teacher samples of a run
    ["train", "exact"],                           # DistillTrainer; the exact-teacher experiment harness
    ["eval", "bench", "memory"],                  # evaluation; benchmarks; the memory planner
    ["compare", "qualtrics", "plan", "preflight"],  # grids and trajectories; the survey; time planner; preflight
    ["pipeline"],                                 # every step, resumable; the ablation
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}

def _opd_module(node) -> list[str]:
    "The opd modules an import node (or `importlib.import_module('opd.x')` call) names."
    if isinstance(node, ast.ImportFrom):
        mod = node.module or ""
        if node.level == 1: return [mod.split(".")[0]] if mod else [a.name for a in node.names]
        if mod == "opd": return [a.name for a in node.names]
        if mod.startswith("opd."): return [mod.split(".")[1]]
    elif isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("opd.")]
    elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
        if node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("opd."):
            return [str(node.args[0].value).split(".")[1]]
    return []

def imports_of(source: str) -> list[tuple[str, int, list[str]]]:
    "(opd module, line, imported names) for every import in `source`, at any depth."
    out = []
    for node in ast.walk(ast.parse(source)):
        for m in _opd_module(node):
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            out.append((m, node.lineno, names))
    return out

def violations(sources: dict[str, str]) -> list[str]:
    "Every import of a module from the same or a higher layer, and every private name taken from another module."
    bad = []
    for name, source in sorted(sources.items()):
        for m, line, names in imports_of(source):
            if m == name or m not in RANK or name not in RANK: continue
            if RANK[m] >= RANK[name]: bad.append(f"opd/{name}.py:{line} imports opd.{m} (layer {RANK[m]} ≥ {RANK[name]})")
            bad += [f"opd/{name}.py:{line} takes the private name {n} from opd.{m}" for n in names if n.startswith("_")]
    return bad

def package_sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in PKG.glob("*.py") if not p.stem.startswith("_")}

def test_every_module_has_a_layer():
    assert sorted(package_sources()) == sorted(RANK), set(package_sources()) ^ set(RANK)

def test_no_module_imports_a_higher_one():
    assert violations(package_sources()) == []

@pytest.mark.parametrize("name,bad", [
    ("models", "def f():\n    from opd.exact import build_exact_pair\n"),           # inside a function
    ("rollout", "from .losses import gaussian_kl\n"),                               # relative, at the top
    ("stats", "import opd.prompts\n"),                                               # `import opd.x`
    ("eval", "def g():\n    import importlib; importlib.import_module('opd.compare')\n"),
    ("hub", "from opd.rollout import GaussianVelocity\n"),                           # same layer
    ("compare", "from opd.eval import _read_run_prompts\n"),                         # a private name
])
def test_the_check_catches_a_bad_import(name, bad):
    src = package_sources()
    assert violations(src) == []
    found = violations(src | {name: src[name] + "\n" + bad})
    assert len(found) == 1 and found[0].startswith(f"opd/{name}.py:"), found

def test_imports_of_sees_every_form():
    src = "from .a import x\nfrom opd.b import y\nfrom opd import c\nimport opd.d\ndef f():\n    from opd.e import _z\n"
    assert [(m, n) for m, _, n in imports_of(src)] == [("a", ["x"]), ("b", ["y"]), ("c", ["c"]), ("d", []), ("e", ["_z"])]
