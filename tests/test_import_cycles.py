"""No import cycles inside `serve/` and `nova/`, and the command-line modules at the top.

The graph is read statically from the source with `ast`, so it sees every import whether or not its optional
dependency (Ray, Gradio, uvicorn...) is installed here. Every `import` and `from ... import` counts wherever it
is written: at module level, inside a function (a lazy import) or under a condition. A lazy import still ties
the two modules together: it only moves the cycle from import time to the first call, where it fails or half
initialises a module just the same, and it hides from a reader which module sits above which. Where a lazy import
exists to keep a heavy optional package (Ray, Gradio, uvicorn) off the import path, it is lazy about *that*
package, never about a module of ours in the other direction; so no exemption is made here.

An edge goes to the module an import names: `from pkg import name` goes to `pkg.name` when that is a module of
ours, else to `pkg`. Relative imports are resolved against the importing module's package. Imports by string
(`importlib.import_module`, as `nova/cli.py` dispatches sub-commands) are not edges: they only ever point down
from the command line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("serve", "nova")
COMMAND_LINES = ("nova.cli", "serve.cli")


@dataclass(frozen=True)
class ImportEdge:
    """`importer` imports `imported`, as written at `path:line`."""

    importer: str
    imported: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.path}:{self.line})"


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of `packages` (a package is its `__init__.py`)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _base_of_from_import(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` reads from, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(package):
        raise ValueError(f"{module}: relative import beyond the top-level package (line {node.lineno})")
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    """The longest leading part of `name` that is one of our modules (`a.b.c` -> `a.b` when `c` is a name)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(root: Path, packages: tuple[str, ...]) -> list[ImportEdge]:
    """Every import between modules of `packages`, at any depth of the source (functions included)."""
    modules = module_files(root, packages)
    edges: list[ImportEdge] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        where = str(path.relative_to(root))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base_of_from_import(node, module, is_package)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if alias.name != "*" and submodule in modules else base)
            for target in targets:
                imported = _known_prefix(target, modules)
                if imported is not None:
                    edges.append(ImportEdge(module, imported, where, node.lineno))
    return edges


def strongly_connected_components(nodes: list[str], edges: list[ImportEdge]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit to worry about)."""
    successors: dict[str, list[str]] = {node: [] for node in nodes}
    for edge in edges:
        successors[edge.importer].append(edge.imported)
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(successors[start]))]
        index[start] = lowlink[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif child not in index:
                index[child] = lowlink[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(successors[child])))
            elif child in on_stack:
                lowlink[node] = min(lowlink[node], index[child])
    return components


def one_cycle(component: list[str], edges: list[ImportEdge]) -> list[ImportEdge]:
    """A shortest cycle through the component's first module, each hop with the line that imports."""
    members = set(component)
    inside = [edge for edge in edges if edge.importer in members and edge.imported in members]
    start = component[0]
    came_by: dict[str, ImportEdge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in inside:
                if edge.importer != node:
                    continue
                if edge.imported == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, came_by[path[0].importer])
                    return path
                if edge.imported not in came_by:
                    came_by[edge.imported] = edge
                    following.append(edge.imported)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")  # a component of >1 module always has one


def import_cycles(root: Path, packages: tuple[str, ...]) -> list[list[ImportEdge]]:
    """One cycle per strongly connected component of more than one module, plus every self-import."""
    edges = import_edges(root, packages)
    nodes = list(module_files(root, packages))
    cycles = [[edge] for edge in edges if edge.importer == edge.imported]
    for component in strongly_connected_components(nodes, edges):
        if len(component) > 1:
            cycles.append(one_cycle(component, edges))
    return cycles


def test_the_graph_sees_relative_lazy_and_absolute_imports():
    """The reader itself: without this, an empty graph would pass the cycle test below."""
    edges = {(edge.importer, edge.imported) for edge in import_edges(REPO, PACKAGES)}
    assert ("serve.app", "serve.routes") in edges  # relative, module level
    assert ("serve.cli", "serve.app") in edges  # relative, inside `run`
    assert ("serve.adapters", "nova.repo") in edges  # absolute, into the other package
    assert ("serve.openapi", "serve") in edges  # `from . import __version__`: a name of the package


def test_a_planted_cycle_is_found_and_named(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def later():\n    from ..c import value\n")
    (package / "c.py").write_text("import pkg.a\nvalue = 1\n")
    (package / "d.py").write_text("from pkg import d\n")
    cycles = import_cycles(tmp_path, ("pkg",))
    assert sorted(" -> ".join(edge.importer for edge in cycle) for cycle in cycles) == [
        "pkg.a -> pkg.sub.b -> pkg.c", "pkg.d"]


def test_no_import_cycles():
    cycles = import_cycles(REPO, PACKAGES)
    assert not cycles, "import cycles:\n" + "\n".join(
        "  " + "\n    ".join(str(edge) for edge in cycle) for cycle in cycles)


def test_nothing_imports_the_command_lines():
    """`nova.cli` and `serve.cli` (`nova serve`) are the top of the graph: what they hold (flags, startup) is
    theirs alone, and what another module needs from them belongs in a module below. (`python -m nova`'s
    `__main__` is the command line's other entry point, above it.)"""
    back = [edge for edge in import_edges(REPO, PACKAGES)
            if edge.imported in COMMAND_LINES and not edge.importer.endswith(".__main__")]
    assert not back, "modules importing a command line:\n" + "\n".join(f"  {edge}" for edge in back)
