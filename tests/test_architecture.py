"""The package's layers (docs/architecture.md): imports point down only, and there is no import cycle.

Imports are read from the source (``ast``), function-level ones included (a lazy import hides a cycle, it
does not remove it); imports under ``if TYPE_CHECKING:`` are annotations only and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_dimat"

# Lower layers first; a module may import its own layer and the layers before it.
LAYERS = [
    ["registry", "validation"],
    ["topology", "partition", "models", "data"],
    ["permutation"],
    ["merge"],
    ["comm"],
    ["swarm"],
    ["strategy"],
    ["callbacks"],
    ["__init__"],
    ["cli"],
    ["experiment"],
    ["console"],
]
# The math layers know nothing of Lightning.
WITHOUT_LIGHTNING = {"registry", "validation", "topology", "partition", "permutation", "merge", "comm"}


def _module_name(path: Path) -> str:
    parts = ["lightning_dimat", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[str]:
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> tuple[nx.DiGraph, dict[str, list[str]]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    external: dict[str, list[str]] = {}
    for name, path in modules.items():
        graph.add_node(name)
        imported = _imports(ast.parse(path.read_text()))
        external[name] = imported
        for target in imported:
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph, external


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module} belongs to no layer of LAYERS: add its package to the architecture.")


def test_the_package_has_no_import_cycle() -> None:
    graph, _ = _graph()
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_imports_point_down_the_layers_only() -> None:
    graph, _ = _graph()
    upward = [f"{source} -> {target}" for source, target in graph.edges if _layer(target) > _layer(source)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", sorted(WITHOUT_LIGHTNING))
def test_the_math_layers_do_not_import_lightning(package: str) -> None:
    _, external = _graph()
    offending = {
        module: sorted(name for name in names if name == "lightning" or name.startswith("lightning."))
        for module, names in external.items()
        if module == f"lightning_dimat.{package}" or module.startswith(f"lightning_dimat.{package}.")
    }
    assert not {module: names for module, names in offending.items() if names}


def test_the_layer_test_sees_every_module_and_a_real_import() -> None:
    graph, _ = _graph()
    assert graph.has_edge("lightning_dimat.callbacks.merge", "lightning_dimat.strategy")
    assert all(_layer(module) >= 0 for module in graph.nodes)
