"""How the modules of src/localdiff import each other, read statically with ``ast``: no import cycle, and
no model file under ``denoisers/`` importing a private name (``_x``) of another (docs/STYLE.md principle 11).

An import at module level (class bodies, ``try`` and ``if`` blocks included; ``if TYPE_CHECKING:`` blocks
excluded, as they never run) is an edge of the graph; an import inside a function is allowed (it defers a
heavy or optional dependency), but it must not be what hides a cycle, so a second graph counts those too.
``import a.b.c`` and ``from a.b import c`` are edges to ``a.b.c`` when that is a module, else to the package.
"""

from __future__ import annotations

import ast
from pathlib import Path


SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "localdiff"


def modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's ``__init__``)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _type_checking(test: ast.expr) -> bool:
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def import_nodes(tree: ast.Module, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported (and, with ``deferred``, those in its
    functions too)."""
    found = []

    def walk(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if deferred:
                    walk(node.body)
            elif isinstance(node, ast.If) and _type_checking(node.test):
                walk(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    walk(getattr(node, field, []) or [])

    walk(tree.body)
    return found


def resolve(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, known) -> list[tuple[str, str]]:
    """``(module, imported name)`` pairs of one statement in module ``name`` (only modules in ``known``);
    the imported name is "" for ``import a.b``."""
    if isinstance(node, ast.Import):
        return [(a.name, "") for a in node.names if a.name in known]
    if node.level:
        base = (name if is_package else name.rpartition(".")[0]).split(".")
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if sub in known:
            out.append((sub, ""))
        elif target in known:
            out.append((target, alias.name))
    return out


def graph(deferred: bool, src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    mods = modules(src, package)
    edges = {}
    for name, (path, is_package) in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {m for node in import_nodes(tree, deferred) for m, _ in resolve(node, name, is_package, mods)}
        edges[name] = targets - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


# training <-> export was one (through its file-name constants, now in unet/files.py); it must not come back
KNOWN_DEFERRED = {frozenset({"localdiff.unet.training", "localdiff.unet.export"})}


def test_the_reader_finds_cycles_at_module_level_and_behind_deferred_imports(tmp_path):
    """On a package made for the purpose: a -> b -> c -> a at module level (relative imports of three
    kinds), d <-> e only through a function, f imported by all and importing none, g under TYPE_CHECKING."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import A\n",
        "a.py": "from .sub import b\nA = 1\n",
        "sub/__init__.py": "",
        "sub/b.py": "import pkg.c\nfrom ..f import F\n",
        "c.py": "try:\n    from . import a\nexcept ImportError:\n    a = None\nfrom .f import F\n",
        "d.py": "from .e import E\nD = 1\n",
        "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .g import G\nE = 1\n"
                "def late():\n    from .d import D\n    return D\n",
        "f.py": "F = 1\n",
        "g.py": "from .e import E\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    now = graph(deferred=False, src=tmp_path, package="pkg")
    assert now["pkg.sub.b"] == {"pkg.c", "pkg.f"} and now["pkg.e"] == set() and now["pkg.c"] == {"pkg.a", "pkg.f"}
    assert cycles(now) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    later = cycles(graph(deferred=True, src=tmp_path, package="pkg"))
    assert sorted(later) == [["pkg.a", "pkg.c", "pkg.sub.b"], ["pkg.d", "pkg.e"]]


def test_no_import_cycle_among_module_level_imports():
    found = cycles(graph(deferred=False))
    assert not found, f"modules that import each other when imported: {found}"


def test_no_import_cycle_is_hidden_by_an_import_inside_a_function():
    """Deferring one import of a cycle makes it run, not go away: the two modules still depend on each other."""
    found = {frozenset(c) for c in cycles(graph(deferred=True))}
    new = found - KNOWN_DEFERRED
    assert not new, f"modules that depend on each other through an import inside a function: {sorted(map(sorted, new))}"


def test_unet_training_and_export_do_not_depend_on_each_other():
    found = {frozenset(c) for c in cycles(graph(deferred=True))}
    assert not (found & KNOWN_DEFERRED)


def test_no_model_file_imports_a_private_name_of_another():
    """Under src/localdiff/denoisers, what one file needs from another is public (no ``from .x import _y``)."""
    mods = modules()
    bad = []
    for name, (path, is_package) in mods.items():
        if not name.startswith(f"{PACKAGE}.denoisers"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in import_nodes(tree, deferred=True):
            for module, imported in resolve(node, name, is_package, mods):
                private = imported.startswith("_") and not imported.startswith("__")
                if private and module != name and module.startswith(f"{PACKAGE}.denoisers"):
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno} imports {imported} from {module}")
    assert not bad, "\n".join(bad)
