"""The package reads downhill: no import circle between its modules (counting imports inside functions
too), the loaders stand on loading.py, and minirestore.hub still offers every public loader."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minirestore", "kernels")


def _imports(path, package):
    """The package modules a file imports, anywhere in it (`from . import X` counts as importing X)."""
    modules = {p.stem for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package if node.level else (node.module or "").split(".")[0]
            if node.level and node.module:
                parts = [package, *node.module.split(".")]
            elif not node.level and node.module and node.module.split(".")[0] in PACKAGES:
                parts = node.module.split(".")
            elif node.level:
                parts = [package]
            else:
                continue
            if len(parts) >= 2:
                found.add(f"{parts[0]}.{parts[1]}")
            else:  # from . import name, or from package import name: the names that are modules
                found |= {f"{base}.{a.name}" for a in node.names if a.name in modules}
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] in PACKAGES and len(parts) >= 2:
                    found.add(f"{parts[0]}.{parts[1]}")
    return {m for m in found if (ROOT / m.replace(".", "/")).with_suffix(".py").exists()}


def graph():
    return {f"{pkg}.{p.stem}": _imports(p, pkg) - {f"{pkg}.{p.stem}"}
            for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py")) if p.stem != "__init__"}


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
