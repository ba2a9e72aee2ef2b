"""The import graph of mimkit: every module imports alone, no import circle, and no module imports a higher layer.

``LAYERS`` is the table DEVELOPING.md documents (lowest first). A module's layer is that of the longest prefix
listed; a module may import its own layer or lower ones. The graph is read with ``ast`` from every ``import``
statement, at module level and inside functions alike (a function-level import is still a dependency; it only
hides a circle until the function runs). An import of ``mimkit.a.b`` is an edge to ``mimkit.a.b`` and to the package
``mimkit.a`` (whose ``__init__`` Python runs first, with everything it imports): a ground-floor module cannot live
in a package whose ``__init__`` pulls in higher layers. The root package ``mimkit`` (the public façade, run before
any submodule whatever imports it) is the one package left out of that rule.

Breaking it: an upward import (``from ..objectives import OBJECTIVES`` in ``mimkit/config.py``, as before issue
11) fails ``test_no_module_imports_a_higher_layer`` and, with objectives importing config, ``test_no_import_circle``;
``from ..checkpoints.io import save_checkpoint`` in ``mimkit/models/vq.py`` (as before issue 20) fails
through the ``checkpoints`` package's ``__init__`` (``test_an_upward_import_through_a_package_init_is_caught``).
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
    ("ground", ["mimkit.errors", "mimkit.files", "mimkit.precision", "mimkit.rundir", "mimkit.checkpoint_files",
                "mimkit.pixels", "mimkit.trackers", "mimkit.flops"]),
    ("masking", ["mimkit.masking"]),
    ("models", ["mimkit.models"]),
    ("config", ["mimkit.config"]),
    ("data", ["mimkit.data"]),
    ("objectives", ["mimkit.objectives"]),
    ("checkpoints", ["mimkit.checkpoints"]),
    ("engine", ["mimkit.engine", "mimkit.run"]),
    ("commands", ["mimkit.pretrain", "mimkit.tokenizer", "mimkit.sweep", "mimkit.eval", "mimkit.features",
                  "mimkit.viz", "mimkit.bench", "mimkit.monitor", "mimkit.views", "mimkit.explore", "mimkit.segment"]),
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


def imports_in(source: str, mod: str, is_pkg: bool, mods: dict) -> set:
    """The mimkit modules that the code ``source`` of module ``mod`` imports anywhere, with their packages."""
    deps = set()
    for node in ast.walk(ast.parse(source, mod)):
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
    own = {mod} | {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}  # already running
    for d in list(deps):  # importing mimkit.a.b runs mimkit.a's __init__ first
        parts = d.split(".")
        deps.update(".".join(parts[:i]) for i in range(2, len(parts)))
    deps -= own
    return deps


def imports(mods: dict) -> dict:
    """Module -> the mimkit modules (and packages) it imports anywhere in its file."""
    return {mod: imports_in(path.read_text(), mod, is_pkg, mods) for mod, (path, is_pkg) in mods.items()}


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


def upward(graph: dict) -> list:
    return [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
            for a, deps in sorted(graph.items()) for b in sorted(deps) if layer(b) > layer(a)]


def test_no_module_imports_a_higher_layer():
    assert upward(imports(modules())) == []


# the one function-level import of a mimkit module: the façade's ``mimkit.load``, so that ``import mimkit.errors``
# (which runs mimkit/__init__.py) does not pull in the checkpoint reader, the objectives and the data layer
FUNCTION_LEVEL = {("mimkit", "mimkit.checkpoints")}


def function_level_imports(mods: dict) -> set:
    """(module, imported mimkit module) for every import of mimkit's own modules inside a function."""
    out = set()
    for mod, (path, is_pkg) in mods.items():
        for f in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = ast.unparse(ast.Module(body=f.body, type_ignores=[]))
                out.update((mod, d) for d in imports_in(body, mod, is_pkg, mods))
    return out


def test_function_level_imports_only_for_optional_packages():
    """Imports of mimkit's own modules sit at module level, where the layer and circle checks see them run; only
    optional heavy packages (W&B, transformers, ...) are imported on use. Moving ``from .viz import
    reconstruction_grid`` back into ``pretrain._figure_callback`` fails this."""
    assert function_level_imports(modules()) == FUNCTION_LEVEL


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
    assert upward(graph) == [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"]
    if edge == ("mimkit.config", "mimkit.objectives"):
        assert any("mimkit.config" in c and "mimkit.objectives" in c for c in cycles(graph))


@pytest.mark.parametrize("line", ["from ..checkpoints.io import save_checkpoint",
                                  "def save(x):\n    from ..checkpoints.io import save_checkpoint",
                                  "import mimkit.checkpoints.hf"])
def test_an_upward_import_through_a_package_init_is_caught(line):
    """The models' tokenizer importing a module of the ``checkpoints`` package (even one that imports nothing
    higher itself) runs that package's ``__init__``, and so the reader and the exporter: an upward import."""
    mods = modules()
    mod = "mimkit.models.vq"
    graph = imports(mods)
    graph[mod] = imports_in(mods[mod][0].read_text() + "\n" + line + "\n", mod, False, mods)
    assert "mimkit.models.vq (models) imports mimkit.checkpoints (checkpoints)" in upward(graph)
