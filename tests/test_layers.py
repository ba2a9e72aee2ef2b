"""The import graph of mimkit: every module imports alone, no import circle, and no module imports a higher layer.

``LAYERS`` is the table DEVELOPING.md documents (lowest first). A module's layer is that of the longest prefix
listed; a module may import its own layer or lower ones. The graph is read with ``ast`` from every ``import``
statement, at module level and inside functions alike (a function-level import is still a dependency; it only
hides a circle until the function runs). An import names the module it names: ``from .checkpoints.io import x``
is an edge to ``mimkit.checkpoints.io`` (Python also runs the parent package's ``__init__``, which is why
``mimkit.checkpoints.io`` can sit on the ground floor only while the package's ``__init__`` stays import-light).

Breaking it: an upward import (``from ..objectives import OBJECTIVES`` in ``mimkit/config.py``, as before issue
11) fails ``test_no_module_imports_a_higher_layer`` and, with objectives importing config, ``test_no_import_circle``.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# lowest first; see DEVELOPING.md ("Layers")
LAYERS = [
    ("ground", ["mimkit.errors", "mimkit.files", "mimkit.precision", "mimkit.rundir", "mimkit.checkpoints.io",
                "mimkit.trackers"]),
    ("masking", ["mimkit.masking"]),
    ("models", ["mimkit.models"]),
    ("config", ["mimkit.config"]),
    ("data", ["mimkit.data"]),
    ("objectives", ["mimkit.objectives"]),
    ("checkpoints", ["mimkit.checkpoints"]),
    ("engine", ["mimkit.engine"]),
    ("commands", ["mimkit.pretrain", "mimkit.tokenizer", "mimkit.sweep", "mimkit.eval", "mimkit.features",
                  "mimkit.viz", "mimkit.bench", "mimkit.monitor", "mimkit.segment"]),
    ("cli", ["mimkit.cli", "mimkit"]),  # ``mimkit`` itself: the package's public façade (mimkit/__init__.py)
]


def modules() -> dict:
    """Every mimkit module: dotted name -> (path, is_package)."""
    out = {}
    for p in sorted((ROOT / "mimkit").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def imports(mods: dict) -> dict:
    """Module -> the mimkit modules it imports anywhere in its file."""
    graph = {}
    for mod, (path, is_pkg) in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "mimkit")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "mimkit":
                    continue
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    deps.add(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def layer(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{mod} is in no layer: add it to LAYERS here and in DEVELOPING.md")
    return rank


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer():
    for mod in modules():
        layer(mod)


def test_no_import_circle():
    assert cycles(imports(modules())) == []


def test_no_module_imports_a_higher_layer():
    bad = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
           for a, deps in sorted(imports(modules()).items()) for b in sorted(deps) if layer(b) > layer(a)]
    assert bad == []


def test_each_module_imports_alone():
    """Each module imported first, with every mimkit module forgotten before (torch stays loaded, so one
    interpreter serves all): a circle that only bites in some import order fails here with its traceback."""
    code = """
import importlib, json, sys, traceback
import torch  # noqa: F401  (kept between modules: the slow part)
failed = {}
for name in json.loads(sys.argv[1]):
    for m in [m for m in sys.modules if m == "mimkit" or m.startswith("mimkit.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc().splitlines()[-1]
print(json.dumps(failed))
"""
    names = [m for m in modules() if m != "mimkit.__main__"]
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("edge", [("mimkit.config", "mimkit.objectives"), ("mimkit.models.vit", "mimkit.data")])
def test_the_checks_catch_an_upward_import(edge):
    """The checks themselves: an added upward edge is reported (and config -> objectives closes a circle)."""
    graph = imports(modules())
    a, b = edge
    graph[a] = graph[a] | {b}
    assert layer(b) > layer(a)
    if edge == ("mimkit.config", "mimkit.objectives"):
        assert any("mimkit.config" in c and "mimkit.objectives" in c for c in cycles(graph))
