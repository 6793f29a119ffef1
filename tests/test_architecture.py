"""The package's import graph stays a DAG: no module reaches itself through imports, lazy ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import drt_peft

ROOT = Path(drt_peft.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (module level, in functions, under TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    return {_module_name(path): _imports(path, modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    assert "drt_peft.checkpoint.io" in graph["drt_peft.model"]  # imported inside a method
    assert "drt_peft.files" in graph["drt_peft.config"]  # relative, module level


def test_the_library_never_imports_its_applications() -> None:
    graph = import_graph()
    library = {module for module in graph if not module.startswith("drt_peft.apps")}
    reaching = sorted(module for module in library if any(dep.startswith("drt_peft.apps") for dep in graph[module]))
    assert reaching == [], f"library modules importing drt_peft.apps: {reaching}"


def test_every_registered_method_is_exported_at_the_top_level() -> None:
    from drt_peft.config import config_class

    exported = {getattr(drt_peft, name) for name in drt_peft.__all__}
    missing = [m for m in drt_peft.available_methods() if config_class(m) not in exported]
    assert missing == [], f"registered methods whose config drt_peft does not export: {missing}"


def package_graph() -> dict[str, set[str]]:
    """:func:`import_graph` with each subpackage of ``drt_peft`` (``layer``, ``masks`` with its criteria, ...) as
    one node, and each top-level module as its own."""
    packages = {_module_name(path) for path in ROOT.glob("*/__init__.py")}

    def node(module: str) -> str:
        return next((name for name in packages if module == name or module.startswith(name + ".")), module)

    graph: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        graph.setdefault(node(module), set()).update(node(dep) for dep in deps)
    return {name: deps - {name} for name, deps in graph.items()}


def test_the_packages_are_layered_too() -> None:
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)
