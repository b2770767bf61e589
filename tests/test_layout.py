"""The package reads downhill: no import circle between its modules (counting imports inside functions
too), the loaders stand on loading.py, and minirestore.hub still offers every public loader."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "minirestore"


def _file(module):
    """The file of one of our modules by dotted name (a package is its __init__.py), else None."""
    path = ROOT / module.replace(".", "/")
    return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.exists()), None)


def _imports(path, module):
    """The package modules a file imports, anywhere in it (`from . import X` counts as importing X)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import X (level 1: this package), from .. import X (its parent), ...
                parents = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if _file(f"{base}.{a.name}") else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] == PACKAGE and _file(m)}


def graph():
    """module -> the package modules it imports, over every file of the package and its subpackages."""
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    names = {f: ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for f in files}
    return {m: _imports(f, m) - {m} for f, m in names.items()}


def test_no_import_circle():
    g = graph()
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(g.get(m, ())):
            assert state.get(n) != "open", "import circle: " + " -> ".join(path[path.index(n):] + [n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_loaders_stand_on_the_foundation():
    g = graph()
    loaders = ("minirestore.hub_flux", "minirestore.hub_text", "minirestore.hub_wan")
    for m in loaders:
        assert "minirestore.loading" in g[m], m
        assert not g[m] & {"minirestore.hub", *loaders}, (m, g[m])  # siblings, not stacked on each other
    assert not g["minirestore.loading"] & {"minirestore.hub", *loaders}
    assert set(loaders) <= g["minirestore.hub"]


def test_hub_offers_the_public_loaders():
    from minirestore import hub

    for name in ("load_flux", "load_autoencoder", "load_t5", "load_clip", "load_wan", "load_wan_vae",
                 "load_t5_tokenizer", "load_clip_tokenizer", "Checkpoint", "load_model", "resolve"):
        assert callable(getattr(hub, name)), name


def test_one_top_level_name():
    """Everything installs under `minirestore`: a second top-level package would collide with other projects'
    (a top-level `kernels` shadowed Hugging Face's `kernels`, which transformers >= 5.25 imports)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {PACKAGE}, packages
    assert set(packages) == {".".join(f.parent.relative_to(ROOT).parts)
                                     for f in (ROOT / PACKAGE).rglob("__init__.py")}, packages  # none left out
