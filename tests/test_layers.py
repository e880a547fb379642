"""The library's shape: one-way layers, imports at the top, small modules, and nothing that points outside the
repository. These checks read the source; they fail as soon as a module imports a later layer."""
import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "sepme_lib"
ROOT = PKG.parent

# Layers, top to bottom: a module may import modules of earlier layers only (docs/DESIGN.md, "Layers").
LAYERS = [
    ["config"],
    ["world", "paper", "report", "plots", "picture", "perceptual", "checkpoint", "storage"],
    ["families"],
    ["model"],
    ["loading"],
    ["concepts", "deltas", "card"],
    ["classifier", "gcirs", "lora"],
    ["nullspace", "adapters"],
    ["attacks"],
    ["sepme"],
    ["closed_form", "finetune", "speed"],
    ["methods"],
    ["evaluate", "separability"],
    ["widgets", "exercise_kit", "robustness"],
    ["exercises_beyond"],
    ["exercises"],
    ["train_tiny", "train_classifier"],
    ["random_sd"],
    ["gpupath"],
    ["t4"],
    ["bench", "course", "scaleout"],
    ["cli"],
    ["__main__"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
# imports allowed inside functions: optional extras that are heavy or not always installed
LAZY_OK = {"lpips", "torchvision", "nbformat", "nbconvert", "accelerate", "papermill", "google"}
MAX_LINES = 450


def modules():
    return sorted(p for p in PKG.glob("*.py") if p.stem != "__init__")


def package_imports(tree):
    """(name of the sepme_lib module imported, node) for every import of the package in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.append((node.module.split(".")[0], node))
            elif node.level == 1:
                out += [(a.name, node) for a in node.names]
            elif node.module and node.module.startswith("sepme_lib"):
                parts = node.module.split(".")
                out += [(parts[1], node)] if len(parts) > 1 else [(a.name, node) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], node) for a in node.names if a.name.startswith("sepme_lib.")]
    return out


def test_every_module_has_a_layer():
    missing = [p.stem for p in modules() if p.stem not in RANK]
    assert not missing, f"add {missing} to LAYERS here and in docs/DESIGN.md"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_imports_only_earlier_layers(path):
    tree = ast.parse(path.read_text())
    bad = [(name, node.lineno) for name, node in package_imports(tree)
           if name in RANK and RANK[name] >= RANK[path.stem] and name != path.stem]
    assert not bad, f"{path.name} imports a module of its own or a later layer: {bad}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_no_imports_inside_functions_except_optional_extras(path):
    tree = ast.parse(path.read_text())
    bad = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." if node.level else node.module.split(".")[0]]
                else:
                    continue
                bad += [(n, node.lineno) for n in names if n not in LAZY_OK]
    assert not bad, f"{path.name} imports inside functions: {bad}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_modules_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.name} has {n} lines (> {MAX_LINES}): split it by what it does"


def test_the_layer_check_can_fail(tmp_path):
    """The check above is real: a lower module importing a higher one is caught."""
    tree = ast.parse("from .methods import erase\nfrom . import world\n")
    names = [n for n, _ in package_imports(tree)]
    assert names == ["methods", "world"] and RANK["methods"] > RANK["deltas"]


OUTSIDE = re.compile(r"\.\./shared|shared/papers|shared/DESIGN|(?<!docs/)DESIGN\.md|\bthe issue\b", re.I)


def test_nothing_points_outside_the_repository():
    files = [*PKG.glob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "notebooks").glob("*.ipynb")]
    bad = [f"{f.relative_to(ROOT)}: {m.group(0)!r}" for f in files if f.exists()
           for m in OUTSIDE.finditer(f.read_text())]
    assert not bad, bad


def test_public_api():
    import sepme_lib as sm

    for name in ("load_model", "load_classifier", "erase", "Delta", "combine", "applied", "leakage", "null_space",
                 "generate", "acc_table"):
        assert callable(getattr(sm, name)), name
    assert callable(sm.Delta.save) and callable(sm.Delta.load)
    assert set(sm.METHODS) == {"sepme", "gcirs", "esd", "ablating", "fmn", "uce", "rece", "mace", "all_but_one",
                               "speed"}
