"""The package's layers (hierpool/algebra/__init__.py) run one way, without cycles, and share no private names.

Read from the source with ``ast`` (every import, at module level or inside a function), so the
check costs no import and fails on the commit that breaks a layer.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hierpool"

# lowest first: a module may import from its own layer's package or from the layers below it
LAYERS = [
    {"hierpool.errors", "hierpool.datasets"},
    {"hierpool.spec", "hierpool.pedigree"},
    {"hierpool.algebra"},
    {"hierpool.closedform"},
    {"hierpool.bayesian"},
    {"hierpool.batch"},
    {"hierpool.plots"},
    {"hierpool.pooling_comparison", "hierpool.ridge", "hierpool.validate"},
    {"hierpool.cli", "hierpool"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(module imported, names taken) for every import in the file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # "from . import x" may import the module x
                sub = f"{target}.{alias.name}"
                path_of = PACKAGE.parent / sub.replace(".", "/")
                is_module = path_of.with_suffix(".py").exists() or (path_of / "__init__.py").exists()
                yield (sub, []) if is_module else (target, [alias.name])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _graph() -> dict[str, list[tuple[str, list[str]]]]:
    return {_module_name(p): [(t, n) for t, n in _imports(p) if t.split(".")[0] == "hierpool"]
            for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    best = None
    for index, members in enumerate(LAYERS):
        for member in members:
            if module == member or module.startswith(member + ".") and member != "hierpool":
                best = index
    assert best is not None or module == "hierpool", f"{module} is in no layer: add it to LAYERS and DESIGN.md"
    return len(LAYERS) - 1 if best is None else best


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _upward(graph) -> list[tuple[str, str]]:
    return [(m, t) for m, imports in graph.items() for t, _ in imports
            if _layer(t) > _layer(m) and m != "hierpool" and _package(t) != _package(m)]


def _cycle(graph) -> list[str] | None:
    """One import cycle of the graph (modules only), or None."""
    edges = {m: {t for t, _ in imports if t in graph} for m, imports in graph.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for module in sorted(edges):
        if module not in state and (found := visit(module, [module])):
            return found
    return None


def _private_crossings(graph) -> list[tuple[str, str, str]]:
    return [(m, t, n) for m, imports in graph.items() for t, names in imports for n in names
            if n.startswith("_") and not n.startswith("__") and _package(t) != _package(m)]


def test_every_module_is_in_a_layer():
    for module in _graph():
        _layer(module)


def test_imports_run_down_the_layers():
    assert not _upward(_graph()), "imports from a higher layer"


def test_no_import_cycles():
    assert _cycle(_graph()) is None


def test_no_private_name_is_imported_from_another_package():
    assert not _private_crossings(_graph())


def test_the_checks_can_fail():
    bad = {
        "hierpool.algebra.criterion": [("hierpool.closedform.model", ["MixedModel"])],  # upward
        "hierpool.closedform.model": [("hierpool.algebra.criterion", ["_private"])],  # private, and a cycle
    }
    assert _upward(bad) == [("hierpool.algebra.criterion", "hierpool.closedform.model")]
    assert _cycle(bad) == ["hierpool.algebra.criterion", "hierpool.closedform.model", "hierpool.algebra.criterion"]
    assert _private_crossings(bad) == [("hierpool.closedform.model", "hierpool.algebra.criterion", "_private")]
