"""The layers (issues 18 and 24): a runtime that never imports torch, the web service on it, a training layer
above it, and the top (cli, api, model_files); each a folder, importing downward only.

Read with the standard library's `ast`, every import counts, including those inside functions; only the bodies of
`if TYPE_CHECKING:` do not (they never run). Three checks:

(a) no import circle among catdog's modules;
(b) runtime modules import only runtime modules of catdog, never a training library (at any level, optional or
    not), and every other package they import unconditionally comes with the runtime install (the standard
    library, `dependencies` in pyproject.toml and what those require; an import inside `try: ... except
    ImportError` is optional and may name anything else);
(c) a fresh interpreter in which torch, torchvision, timm, sklearn and matplotlib cannot be imported imports every
    runtime module, and `catdog.cli` and `catdog.api` (the top layer, which may import training modules inside
    functions for an optional extra).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import pytest

# The layers, one folder each, from the bottom: a module may import its own layer and those below it, never one
# above or beside it. The package itself (`catdog/__init__.py`: the version and the API's names) is runtime.
LAYERS = {
    "runtime": ("catdog", "catdog.runtime"),  # no torch: predict, explain, the model file, ...
    "serve": ("catdog.serve",),  # the web service, on the runtime alone
    "training": ("catdog.training",),  # torch: train, evaluate, export, tune, ...
    "top": ("catdog.cli", "catdog.api", "catdog.model_files", "catdog.__main__"),
}
BELOW = {"runtime": set(), "serve": {"runtime"}, "training": {"runtime"}, "top": {"runtime", "serve", "training"}}
RUNTIME_LAYERS = ("runtime", "serve")  # what `pip install catdog` runs: never imports a training library
TOP_MODULES = LAYERS["top"]
# Packages that only the `train` / `tune` extras install: never imported by a runtime module, at any level.
TRAINING_LIBRARIES = ("torch", "torchvision", "timm", "sklearn", "scipy", "matplotlib", "optuna", "captum",
                      "safetensors", "onnx", "onnxscript", "cleanlab", "tensorboard", "huggingface_hub", "psycopg")
# Blocked in (c): `sys.modules[name] = None` makes `import name` raise ImportError.
BLOCKED_IN_SUBPROCESS = ("torch", "torchvision", "timm", "sklearn", "matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
PACKAGE = SOURCE / "catdog"


# --- reading the sources ----------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def modules_on_disk() -> dict[str, Path]:
    """Every catdog module: dotted name -> file (a package is its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if all(part.isidentifier() for part in parts):
            modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> str | None:
    """The layer whose folder (or listed module) holds `module`: the longest matching prefix wins."""
    best, length = None, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = layer, len(prefix)
    return best


def runtime_modules() -> list[str]:
    return sorted(name for name in modules_on_disk() if layer_of(name) in RUNTIME_LAYERS)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    caught = handler.type
    names = caught.elts if isinstance(caught, ast.Tuple) else [caught]
    return caught is None or any(isinstance(name, ast.Name) and name.id in (
        "ImportError", "ModuleNotFoundError", "Exception", "BaseException") for name in names)


class _Imports(ast.NodeVisitor):
    """Every import statement of a module (at any depth), skipping the bodies of `if TYPE_CHECKING:`; each with
    whether it is optional (in the body of a `try` that catches ImportError)."""

    def __init__(self):
        self.found: list[tuple[ast.Import | ast.ImportFrom, int, bool]] = []
        self.optional = 0

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(catches_import_error(handler) for handler in node.handlers)
        self.optional += guarded
        for child in node.body:
            self.visit(child)
        self.optional -= guarded
        for child in (*node.handlers, *node.orelse, *node.finalbody):
            self.visit(child)

    def visit_If(self, node: ast.If) -> None:
        if is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append((node, node.lineno, self.optional > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, node.lineno, self.optional > 0))


def resolve_relative(module: str, level: int, target: str | None) -> str:
    """The absolute name of `from <dots><target> import ...` written in `module`."""
    is_package = modules_on_disk()[module].name == "__init__.py"
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


@lru_cache(maxsize=None)
def imports_with_guards(module: str) -> tuple[tuple[str, int, bool], ...]:
    """(imported name, line, optional) for every import in `module`. For `from X import y` the name is X.y when
    that is a catdog module (a submodule import), else X; for `import X.Y` it is X.Y. Optional: inside the body of
    a `try` that catches ImportError."""
    path = modules_on_disk()[module]
    visitor = _Imports()
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    names = []
    for node, line, optional in visitor.found:
        if isinstance(node, ast.Import):
            names += [(alias.name, line, optional) for alias in node.names]
            continue
        base = resolve_relative(module, node.level, node.module) if node.level else node.module
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            names.append((submodule if submodule in modules_on_disk() else base, line, optional))
    return tuple(dict.fromkeys(names))  # `from X import a, b` once per line


def imports_of(module: str) -> tuple[tuple[str, int], ...]:
    """(imported name, line) for every import in `module`, optional or not."""
    return tuple(dict.fromkeys((name, line) for name, line, _ in imports_with_guards(module)))


def catdog_module_of(name: str) -> str | None:
    """The catdog module an imported name refers to (the longest prefix that is a module), or None if not catdog."""
    if name != "catdog" and not name.startswith("catdog."):
        return None
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules_on_disk():
            return candidate
        parts.pop()
    return name  # a catdog module that does not exist; reported by the checks that look


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported catdog module: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module in modules_on_disk():
        edges: dict[str, int] = {}
        for name, line in imports_of(module):
            target = catdog_module_of(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def where(module: str, line: int) -> str:
    return f"{modules_on_disk()[module].relative_to(ROOT)}:{line}"


# --- (a) no import circle ---------------------------------------------------------------------------------------

def strongly_connected_components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit)."""
    index_of: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for start in graph:
        if start in index_of:
            continue
        work = [(start, iter(graph.get(start, ())))]
        index_of[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index_of:
                    index_of[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index_of[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index_of[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def one_circle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest circle through the first module of a component, as a list of modules (first == last)."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in graph[node]:
                if child == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return component


def test_the_import_graph_is_read():
    graph = import_graph()
    assert "catdog.cli" in graph and "catdog.serve" in graph
    assert any(graph.values()), "no catdog module imports another: the reader is broken"


def test_no_import_circle():
    graph = import_graph()
    circles = []
    for component in strongly_connected_components(graph):
        circle = one_circle(graph, component)
        steps = [f"{a} -> {b} ({where(a, graph[a][b])})" for a, b in zip(circle, circle[1:]) if b in graph[a]]
        circles.append(f"{len(component)} modules {component}, e.g.\n    " + "\n    ".join(steps))
    assert not circles, "import circles among catdog's modules:\n  " + "\n  ".join(circles)


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"e": 1}}
    components = strongly_connected_components(graph)
    assert components == [["a", "b", "c"]]
    assert one_circle(graph, components[0]) == ["a", "b", "c", "a"]


# --- (b) the runtime imports only the runtime ---------------------------------------------------------------------

def test_every_module_is_in_one_layer_and_every_listed_module_exists():
    assert not [name for name in modules_on_disk() if layer_of(name) is None]
    missing = [name for name in TOP_MODULES if name not in modules_on_disk()]
    assert not missing, f"listed in LAYERS['top'] but not under src/catdog: {missing}"
    assert {"catdog.runtime.predict", "catdog.serve.app"} <= set(runtime_modules())
    assert layer_of("catdog.training.train") == "training" and layer_of("catdog") == "runtime"


def test_imports_run_downward_only():
    """No import, at any depth (inside functions too), reaches a layer above or beside the importer's."""
    problems = []
    for module, edges in import_graph().items():
        own = layer_of(module)
        for target, line in edges.items():
            reached = layer_of(target)
            if reached != own and reached not in BELOW[own]:
                problems.append(f"{where(module, line)}: {module} ({own}) imports {target} ({reached})")
    assert not problems, "imports running up or across a layer:\n  " + "\n  ".join(problems)


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("catdog.runtime.predict") == "runtime" and "training" not in BELOW["runtime"]
    assert "serve" not in BELOW["training"] and "training" not in BELOW["serve"]


def test_runtime_modules_import_no_training_module_and_no_training_library():
    runtime = set(runtime_modules())
    problems = []
    for module in sorted(runtime & set(modules_on_disk())):
        for name, line in imports_of(module):
            target = catdog_module_of(name)
            if target is not None and target not in runtime:
                problems.append(f"{where(module, line)}: {module} imports {name} (not a runtime module)")
            elif name.split(".")[0] in TRAINING_LIBRARIES:
                problems.append(f"{where(module, line)}: {module} imports {name} (a training library)")
    assert not problems, "the runtime layer reaches above itself:\n  " + "\n  ".join(problems)


def _requirement_closure() -> set[str]:
    """Import names (top-level) of the distributions the runtime install brings: pyproject's `dependencies` and,
    transitively, what they require, as installed in this environment."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    requirements_module = pytest.importorskip("packaging.requirements")

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pending = [requirements_module.Requirement(text) for text in dependencies]
    seen: dict[str, metadata.Distribution] = {}
    while pending:
        requirement = pending.pop()
        name = canonical(requirement.name)
        if name in seen:
            continue
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: nothing to learn its import names from
        seen[name] = distribution
        extras = {canonical(extra) for extra in requirement.extras}
        for text in distribution.requires or ():
            child = requirements_module.Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras | {""}):
                pending.append(child)
    providers = metadata.packages_distributions()
    provided = {top for top, owners in providers.items() if any(canonical(owner) in seen for owner in owners)}
    return provided


def test_runtime_modules_import_only_what_the_runtime_install_brings():
    provided = _requirement_closure()
    assert {"numpy", "PIL", "onnxruntime", "fastapi"} <= provided, provided
    standard = set(sys.stdlib_module_names)
    problems = []
    for module in sorted(set(runtime_modules()) & set(modules_on_disk())):
        for name, line, optional in imports_with_guards(module):
            top = name.split(".")[0]
            if optional or top == "catdog" or top in standard or top in provided or top == "__future__":
                continue  # an optional import (try/except ImportError) of another package is fine
            problems.append(f"{where(module, line)}: {module} imports {name}, which the runtime install "
                            f"(pyproject.toml `dependencies`) does not bring")
    assert not problems, "\n  ".join(["runtime modules import packages outside the runtime:", *problems])


# --- (c) importing without torch --------------------------------------------------------------------------------

def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)


IMPORT_EACH = """
import importlib, json, sys, traceback
for blocked in {blocked!r}:
    sys.modules[blocked] = None  # `import torch` now raises ImportError
failures = {{}}
for name in {names!r}:
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps({{"failures": failures, "loaded": sorted(m for m in sys.modules if sys.modules[m] is not None)}}))
"""


def test_runtime_and_top_modules_import_without_torch():
    names = [name for name in (*runtime_modules(), *TOP_MODULES) if name in modules_on_disk() and name != "catdog.__main__"]
    result = run_python(IMPORT_EACH.format(blocked=BLOCKED_IN_SUBPROCESS, names=names))
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.splitlines()[-1])["failures"]
    assert not failures, "\n".join(f"{name} does not import without torch:\n{error}"
                                   for name, error in failures.items())


def test_importing_the_runtime_loads_no_training_library():
    """The same modules, nothing blocked: none of them brings a training library in by any route (importlib,
    a dependency's optional import, ...)."""
    names = [name for name in runtime_modules() if name in modules_on_disk()]
    result = run_python(IMPORT_EACH.format(blocked=(), names=names))
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert not outcome["failures"], outcome["failures"]
    loaded = {name.split(".")[0] for name in outcome["loaded"]}
    assert not loaded & set(TRAINING_LIBRARIES), sorted(loaded & set(TRAINING_LIBRARIES))
