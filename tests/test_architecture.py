"""The shape of the code, held by tests: imports point one way (chimera <- trainers <- search <-
results <- cluster), no import cycles, Ray only under cluster/ray (and the modules that start
it), and no function or module too long to read."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("chimera", "trainers", "search", "results", "cluster")  # each may import its left
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 480


def modules():
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            yield name.removesuffix(".__init__"), path


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from package import module` imports the module (the package's __init__ runs
            # first, but that is Python's order, not a dependency of the package on its user)
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules or {node.module})
            if len(submodules) < len(node.names):
                found.add(node.module)
    return found


MODULES = dict(modules())


def test_imports_point_one_way():
    wrong = []
    for name, path in MODULES.items():
        layer = LAYERS.index(name.split(".")[0])
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > layer:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {name: {m for m in imports_of(path) if m in MODULES and m != name}
             for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                pytest.fail(f"import cycle: {' -> '.join([*trail, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_ray_stays_in_its_room():
    """Ray is imported only under cluster/ (by cluster/ray, and by the app and command modules
    that start or stop it); the library packages import without it."""
    users = sorted(name for name, path in MODULES.items()
                   if any(m == "ray" or m.startswith("ray.") for m in imports_of(path)))
    assert all(name.startswith("cluster.") for name in users), users
    library = [name for name in MODULES if name.split(".")[0] in LAYERS[:4]]
    code = ("import sys; sys.modules['ray'] = None\n"  # any `import ray` now fails
            + "".join(f"import {name}\n" for name in library))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_functions_and_modules_stay_readable():
    long = []
    for name, path in MODULES.items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
