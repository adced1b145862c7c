"""The package's layers point one way, and no module imports itself back through others.

data -> models -> inference (preprocessing, scoring, serving) -> evaluation -> posthoc (temperature, decision rule,
gates, ensembles, soups) -> training -> web / CLI, with the clinical domain (class catalogue, triage, condition
knowledge) below them all. Every import counts: one inside a function or under ``TYPE_CHECKING`` is still an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Lowest first. A module may import from its own layer and the ones below it.
LAYERS = (
    ("dermsight", "dermsight.files"),  # the version and file helpers any layer may use
    ("dermsight.domain",),
    ("dermsight.data",),
    ("dermsight.models",),
    ("dermsight.inference",),
    ("dermsight.evaluation",),
    ("dermsight.posthoc",),
    ("dermsight.training",),
    ("dermsight.web",),
    ("dermsight.cli",),
)


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the dermsight modules it imports, anywhere in its body."""
    files = {module_name(p, root): p for p in (root / "dermsight").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # "from dermsight.inference import predictor" imports the module dermsight.inference.predictor
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t.split(".")[0] == "dermsight" and t != mod}
        graph[mod] = edges
    return graph


def layer(mod: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (
                (mod == name or mod.startswith(name + "."))
                and len(name) > best
                and not (name == "dermsight" and mod != "dermsight")
            ):
                best, rank = len(name), i
    if rank is None:
        raise AssertionError(f"{mod} is in no layer: add it to LAYERS")
    return rank


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer():
    for mod in import_graph():
        layer(mod)


def test_no_import_points_up_a_layer():
    assert upward_edges(import_graph()) == []


def test_no_import_cycles_even_inside_functions():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_edge_and_a_hidden_cycle(tmp_path):
    pkg = tmp_path / "dermsight"
    for name, text in {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/images.py": "def f():\n    from dermsight.models.bundle import x\n",  # upward, inside a function
        "models/__init__.py": "",
        "models/bundle.py": "from dermsight.data import images\nfrom . import card\n",
        "models/card.py": "from .bundle import x\n",  # a cycle through a relative import
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path)
    assert upward_edges(graph) == ["dermsight.data.images -> dermsight.models.bundle"]
    assert cycles(graph) == [["dermsight.data.images", "dermsight.models.bundle", "dermsight.models.card"]]


@pytest.mark.parametrize("heavy", ["torch", "onnxruntime"])
def test_the_domain_and_the_web_settings_check_load_no_inference_stack(heavy):
    """`dermsight.domain` and `inference.types` stay light: the web app's settings check and the triage rule must not
    pull in the network's libraries."""
    import subprocess
    import sys

    code = (
        "import sys; import dermsight.domain.triage, dermsight.domain.knowledge, dermsight.inference.types; "
        f"sys.exit(1 if {heavy!r} in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
