"""The bundle's code imports without cycles: each `python -m scripts.<x>` entry point (and the strategy
registry) imports on its own in a fresh interpreter, no module of `scripts/mtl` imports the package
`scripts.mtl` (the registry, which imports them), and the import graph of `scripts` (function-level
imports included) has no cycle."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BUNDLE

SCRIPTS = BUNDLE / "scripts"


def module_files(root: Path = SCRIPTS) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, whether it is a package's `__init__`) of every module under `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


MODULES = module_files()


def imported_names(source: str, name: str, is_package: bool, known: set[str]) -> list[str]:
    """What each import statement of module `name` (anywhere in its `source`) imports: the dotted module
    for `import a.b`; for `from a import x`, `a.x` when that is a module of `known`, else `a`
    (relative imports resolved)."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                origin = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                found.append(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` (node -> successors) as [a, b, ..., a], or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                return cycle
    return []


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports (a package's own `__init__` is not an edge of its
    submodules: Python runs it first whatever they import)."""
    known = set(modules)
    return {name: {m for m in imported_names(path.read_text(), name, is_package, known) if m in known and m != name}
            for name, (path, is_package) in modules.items()}


def imports_of_package(source: str, name: str, package: str = "scripts.mtl") -> list[str]:
    """The import statements of module `name` (a submodule of `package`) that import `package` itself."""
    parent, _, last = package.rpartition(".")
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [f"import {a.name}" for a in node.names if a.name == package]
        elif isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:
                anchor = name.split(".")[:len(name.split(".")) - node.level]
                origin = ".".join(anchor + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            if origin == package or (origin == parent and last in names):
                bad.append(f"from {origin} import {', '.join(names)}")
    return bad


# the `python -m scripts.<x>` entry points, and the strategy registry that configs build from
ENTRY_POINTS = sorted(n for n, (p, _) in MODULES.items() if '__name__ == "__main__"' in p.read_text()) + ["scripts.mtl"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_each_entry_point_imports_alone_in_a_fresh_interpreter(module):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BUNDLE)}
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=BUNDLE, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"import {module} failed:\n{done.stderr[-3000:]}"


def test_no_module_of_mtl_imports_the_registry_package():
    methods = {n: p for n, (p, is_package) in MODULES.items() if n.startswith("scripts.mtl.") and not is_package}
    assert {"scripts.mtl.base", "scripts.mtl.igreg", "scripts.mtl.equal"} <= set(methods)
    bad = {n: imports_of_package(p.read_text(), n) for n, p in methods.items()}
    assert not {n: b for n, b in bad.items() if b}


def test_the_import_graph_of_scripts_has_no_cycle():
    assert find_cycle(import_graph(MODULES)) == []


def test_the_checks_see_a_cycle_and_an_import_of_the_package():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    known = {"scripts.mtl", "scripts.mtl.base", "scripts.mtl.igreg"}
    assert imported_names("def f():\n    from scripts.mtl import igreg\n", "scripts.mtl.base", False,
                          known) == ["scripts.mtl.igreg"]
    assert imported_names("from .base import x\nfrom . import igreg\n", "scripts.mtl.equal", False,
                          known) == ["scripts.mtl.base", "scripts.mtl.igreg"]
    for source in ("from scripts.mtl import STRATEGIES", "import scripts.mtl", "from scripts import mtl",
                   "def f():\n    from . import STRATEGIES", "from .. import mtl"):
        assert imports_of_package(source, "scripts.mtl.igreg"), source
    for source in ("from scripts.mtl.base import MTLStrategy", "import scripts.mtl.base", "from .base import take_rows",
                   "from scripts.networks import IGRegNet"):
        assert not imports_of_package(source, "scripts.mtl.igreg"), source
