"""The layout reads top to bottom (docs/architecture.md): every import of the package,
module-level or inside a function, goes to the same layer or a lower one, never in a
loop; the config and placement modules import no TensorFlow; no source file is long."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("tfdlrm", "pipelines", "baselines")

# Lowest first: a module may import from its own layer or any layer before it.
LAYERS = [
    ("config", ("tfdlrm", "tfdlrm._env", "tfdlrm.errors", "tfdlrm.presets", "tfdlrm.tables", "tfdlrm.sizes",
                "tfdlrm.metrics", "tfdlrm.stats")),
    ("layers", ("tfdlrm.layers",)),
    ("models", ("tfdlrm.models", "tfdlrm.baselines")),
    ("data", ("tfdlrm.pipelines",)),
    ("parallel", ("tfdlrm.parallel",)),
    ("training", ("tfdlrm.training",)),
    ("serving", ("tfdlrm.serving",)),
    ("compare", ("tfdlrm.compare",)),
    ("bench", ("tfdlrm.bench",)),
    ("cli", ("tfdlrm.cli", "tfdlrm.__main__")),
]
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] != "tfdlrm":  # pipelines/ and baselines/ are tfdlrm.pipelines, tfdlrm.baselines
        parts.insert(0, "tfdlrm")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for top in PACKAGES for p in sorted((REPO / top).rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index of the layer holding ``module``: the longest matching prefix wins."""
    best, length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (``from X import name``
    counts as X.name where that is a module, else X)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One import loop as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_module_has_a_layer():
    for module in source_files():
        layer_of(module)


def test_no_import_loops():
    graph = import_graph()
    # A package's __init__ re-exporting its own modules is not a loop through the package.
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_the_checks_find_a_loop_and_an_upward_edge():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("tfdlrm.cli.main") > layer_of("tfdlrm.training.loop") > layer_of("tfdlrm.pipelines.reader")
    assert layer_of("tfdlrm.layers.mlp") < layer_of("tfdlrm.baselines.dcn")


@pytest.mark.parametrize("module", ["tfdlrm.presets", "tfdlrm.tables", "tfdlrm.sizes", "tfdlrm.parallel.devices",
                                    "tfdlrm.parallel.plan", "tfdlrm.parallel.netns", "tfdlrm.parallel.cluster",
                                    "tfdlrm.cli.parser"])
def test_config_and_placement_import_no_tensorflow(module):
    code = f"import sys, {module}; sys.exit(1 if 'tensorflow' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"{module} imports TensorFlow" + proc.stderr


def test_no_source_file_is_long():
    long = {str(p.relative_to(REPO)): n for p in source_files().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
