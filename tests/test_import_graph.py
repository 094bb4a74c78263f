"""The import graph of ldm_jax runs one way: no cycles (function-level imports included) and no
import of a higher layer from a lower one (docs: DESIGN.md, "Layout").

Every module is parsed with `ast`, so imports inside functions count as much as top-level ones.
Edges: `import a.b` -> a.b; `from a import b` -> a.b when b is a submodule, else a (its
__init__); relative imports are resolved; a string constant naming a module (`"ldm_jax.x.y"` or
`"ldm_jax.x.y:attr"`, as in the lazy-import table of `ldm_jax.data`) is a lazy import of it.
Ignored: `if TYPE_CHECKING:` blocks (never executed) and `if __name__ ==
"__main__":` blocks (they run only when the file is a script named `__main__`, so they can neither
close a cycle nor make importing the library pull in what they run).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import textwrap
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ldm_jax"

_LOWER_LAYERS = (
    "ldm_jax.models",
    "ldm_jax.diffusion",
    "ldm_jax.spec",
    "ldm_jax.tokenizers",
    "ldm_jax.presets",
    "ldm_jax.latent_diffusion",
)
_IO_AND_APPS = ("ldm_jax.checkpoints", "ldm_jax.sampling", "ldm_jax.training", "ldm_jax.cli")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Modules under `importers` (prefixes) must not import modules under `forbidden`."""

    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    why: str
    allowed: tuple[str, ...] = ()  # importers exempt from the rule


RULES = (
    Rule(
        importers=_LOWER_LAYERS,
        forbidden=_IO_AND_APPS,
        why="networks, diffusion math, the spec and the shared LDM glue never depend on IO or apps",
    ),
    Rule(
        importers=("ldm_jax",),
        forbidden=("ldm_jax.cli",),
        allowed=("ldm_jax.cli", "ldm_jax.convert"),
        why="only the CLI and its documented shim (`python -m ldm_jax.convert`) import the CLI",
    ),
    Rule(
        importers=("ldm_jax.training.ldm_step", "ldm_jax.sampling.tasks"),
        forbidden=("ldm_jax.checkpoints",),
        why="the train step and the sampling tasks are pure functions: they do no IO",
    ),
)

_MODULE_STRING = re.compile(r"^ldm_jax(\.\w+)+(:\w+)?$")


@dataclasses.dataclass(frozen=True)
class Edge:
    importer: str
    target: str
    where: str  # "path:line"
    how: str  # "import", "function-level import" or "lazy (string)"


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (packages by __init__.py)."""
    root = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_skipped_block(node: ast.If) -> bool:
    """`if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` / `if __name__ == "__main__":`."""
    test = node.test
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return True
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def _walk(node: ast.AST, in_function: bool = False):
    """(node, in_function) for every node, skipping the bodies of TYPE_CHECKING/__main__ blocks."""
    yield node, in_function
    if isinstance(node, ast.If) and _is_skipped_block(node):
        children = node.orelse
    else:
        children = list(ast.iter_child_nodes(node))
    inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in children:
        yield from _walk(child, inner)


def _known(name: str, modules) -> str | None:
    """The longest prefix of `name` that is a module of the package (None outside ldm_jax)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def module_edges(module: str, path: Path, modules, root: Path) -> list[Edge]:
    """Every edge from `module` to another module of the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    where_path = path.relative_to(root)
    edges = []

    def add(name: str, node: ast.AST, how: str):
        target = _known(name, modules)
        if target is not None and target != module:
            edges.append(Edge(module, target, f"{where_path}:{node.lineno}", how))

    for node, in_function in _walk(tree):
        how = "function-level import" if in_function else "import"
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, how)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base, node, how)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_STRING.match(node.value)
        ):
            add(node.value.partition(":")[0], node, "lazy (string)")
    return edges


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, list[Edge]]:
    modules = module_files(package_dir)
    root = package_dir.parent
    return {name: module_edges(name, path, modules, root) for name, path in modules.items()}


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected component that has one."""
    targets = {m: sorted({e.target for e in es if e.target in graph}) for m, es in graph.items()}
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def strongconnect(v):  # Tarjan; package graphs are small, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in targets[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in targets[start]:
            continue
        cycles.append(_cycle_through(start, component, graph))
    return cycles


def _cycle_through(start: str, component: set[str], graph) -> list[Edge]:
    """A shortest path start -> ... -> start inside one strongly connected component (BFS)."""
    previous: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        next_frontier = []
        for v in frontier:
            for edge in graph[v]:
                if edge.target not in component or edge.target in previous:
                    continue
                previous[edge.target] = edge
                if edge.target == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, previous[path[0].importer])
                    return path
                next_frontier.append(edge.target)
        frontier = next_frontier
    raise AssertionError(f"no cycle through {start}")  # unreachable for a real component


def forbidden_edges(graph: dict[str, list[Edge]], rules=RULES) -> list[tuple[Edge, Rule]]:
    return [
        (edge, rule)
        for edges in graph.values()
        for edge in edges
        for rule in rules
        if _under(edge.importer, rule.importers)
        and not _under(edge.importer, rule.allowed)
        and _under(edge.target, rule.forbidden)
    ]


def format_cycle(cycle: list[Edge]) -> str:
    steps = [f"{e.importer} --[{e.how}, {e.where}]--> " for e in cycle]
    return "".join(steps) + cycle[-1].target


def format_violation(edge: Edge, rule: Rule) -> str:
    return f"{edge.importer} imports {edge.target} ({edge.how}, {edge.where}): {rule.why}"


def test_ldm_jax_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100, "the parser found no imports"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in ldm_jax:\n" + "\n".join(map(format_cycle, cycles))


def test_ldm_jax_imports_follow_the_layering_rules():
    violations = forbidden_edges(import_graph())
    assert not violations, "forbidden imports in ldm_jax:\n" + "\n".join(
        format_violation(edge, rule) for edge, rule in violations
    )


# The checker itself, on synthetic input: these fail if it would let a violation through.


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = tmp_path / "ldm_jax" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return tmp_path / "ldm_jax"


def test_checker_reports_a_cycle_with_its_path():
    graph = {
        "ldm_jax.a": [Edge("ldm_jax.a", "ldm_jax.b", "a.py:1", "import")],
        "ldm_jax.b": [Edge("ldm_jax.b", "ldm_jax.c", "b.py:2", "import")],
        "ldm_jax.c": [Edge("ldm_jax.c", "ldm_jax.a", "c.py:3", "function-level import")],
        "ldm_jax.d": [Edge("ldm_jax.d", "ldm_jax.a", "d.py:1", "import")],
    }
    (cycle,) = find_cycles(graph)
    assert format_cycle(cycle) == (
        "ldm_jax.a --[import, a.py:1]--> ldm_jax.b --[import, b.py:2]--> "
        "ldm_jax.c --[function-level import, c.py:3]--> ldm_jax.a"
    )
    del graph["ldm_jax.c"][0]
    assert find_cycles(graph) == []


def test_checker_reports_a_forbidden_edge():
    edge = Edge("ldm_jax.models.unet", "ldm_jax.checkpoints.load", "unet.py:9", "import")
    shim = Edge("ldm_jax.convert", "ldm_jax.cli.convert", "convert.py:1", "import")
    pure = Edge("ldm_jax.sampling.tasks", "ldm_jax.checkpoints", "t.py:4", "function-level import")
    graph = {
        "ldm_jax.models.unet": [edge],
        "ldm_jax.convert": [shim],
        "ldm_jax.sampling.tasks": [pure],
    }
    violations = forbidden_edges(graph)
    assert [(e.importer, e.target) for e, _ in violations] == [
        ("ldm_jax.models.unet", "ldm_jax.checkpoints.load"),
        ("ldm_jax.sampling.tasks", "ldm_jax.checkpoints"),
    ]
    message = format_violation(*violations[0])
    assert message.startswith("ldm_jax.models.unet imports ldm_jax.checkpoints.load (import, unet")


def test_parser_sees_function_level_relative_and_lazy_imports(tmp_path):
    package_dir = _package(
        tmp_path,
        {
            "__init__.py": "",
            "spec.py": "X = 1\n",
            "models/__init__.py": "from ldm_jax.models import unet\n",
            "models/unet.py": """\
            from typing import TYPE_CHECKING
            from . import layers
            from .. import spec
            if TYPE_CHECKING:
                from ldm_jax import checkpoints
            def load():
                from ldm_jax.checkpoints.load import read
            if __name__ == "__main__":
                import ldm_jax.cli
            """,
            "models/layers.py": "import ldm_jax.models\nfrom ldm_jax.models import unet as _u\n",
            "checkpoints/__init__.py": "",
            "checkpoints/load.py": "TABLE = {'x': 'ldm_jax.spec:X'}\n",
            "cli/__init__.py": "",
        },
    )
    graph = import_graph(package_dir)
    edges = {(e.importer, e.target, e.how) for es in graph.values() for e in es}
    assert edges == {
        ("ldm_jax.models", "ldm_jax.models.unet", "import"),
        ("ldm_jax.models.unet", "ldm_jax.models.layers", "import"),
        ("ldm_jax.models.unet", "ldm_jax.spec", "import"),
        ("ldm_jax.models.unet", "ldm_jax.checkpoints.load", "function-level import"),
        ("ldm_jax.models.layers", "ldm_jax.models", "import"),
        ("ldm_jax.models.layers", "ldm_jax.models.unet", "import"),
        ("ldm_jax.checkpoints.load", "ldm_jax.spec", "lazy (string)"),
    }
    cycles = {frozenset(e.importer for e in c) for c in find_cycles(graph)}
    assert cycles == {frozenset({"ldm_jax.models", "ldm_jax.models.unet", "ldm_jax.models.layers"})}
    assert [(e.importer, e.target) for e, _ in forbidden_edges(graph)] == [
        ("ldm_jax.models.unet", "ldm_jax.checkpoints.load")
    ]
