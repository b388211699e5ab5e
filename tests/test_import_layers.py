"""One direction of imports: each module imports only from its own layer or the layers below
it, and no modules import each other in a cycle.

The import graph is read from the source with ``ast``, without importing anything: every
``import x`` and ``from x import y`` of drosim/ (``drosim``), llm/ (``drosim.llm``) and
paper_checks/ (``drosim.paper_checks``), at module level or inside a function, counts as an
edge to the module it names (``from package import submodule`` names the submodule). The
layers count every import; the cycles count those that run, not those under
``if TYPE_CHECKING:`` (annotations only, the usual way to name a type without a cycle).
Imports of names built at run time (``importlib.import_module(f"drosim.studies.{name}")``,
entry points) are not seen.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed package -> its folder in the repository (as setup.py maps them)
TREES = {"drosim": "drosim", "drosim.llm": "llm", "drosim.paper_checks": "paper_checks"}

# The layers, lowest first. A module belongs to the layer of its longest matching pattern:
# a module's name, or "prefix.*" for every module below prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # the library: dro, world, estimators, newton, certificates, smoothing, online, stats,
    # chunks, radius, methods, output and any new module of drosim/ not placed above
    ("core", ("drosim", "drosim.*")),
    ("figures", ("drosim.plotting",)),
    # the Monte-Carlo studies, each with its figures
    ("studies", ("drosim.studies", "drosim.studies.*")),
    # drosim study / worst-case; drosim run is added from paper_checks by an entry point
    ("core command line", ("drosim.cli",)),
    # llm/: drosim.llm.components and any module of llm/ not placed above or below
    ("llm components", ("drosim.llm", "drosim.llm.*")),
    # whole runs built from the components: trainer, stage-0 recipes, export, demo, reports
    ("llm recipes", ("drosim.llm.recipes", "drosim.llm.recipes.*")),
    # the cvxpy oracle: for tests, paper checks and benchmarks, never for the library or llm
    ("oracle", ("drosim.reference",)),
    ("paper checks", ("drosim.paper_checks", "drosim.paper_checks.*")),
    # the minority study runs the demo many times and is started from the command line
    ("command lines", ("drosim.llm.cli", "drosim.llm.studies", "drosim.llm.studies.*",
                       "drosim.paper_checks.__main__")),
)


def _modules() -> dict[str, Path]:
    """Every module of the three trees by its installed name (a package by its own name)."""
    modules = {}
    for package, folder in TREES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _deepest(name: str, modules: Collection[str]) -> str | None:
    """The longest of ``a.b.c``, ``a.b``, ``a`` that is one of ``modules``, or None."""
    parts = name.split(".")
    return next((".".join(parts[:end]) for end in range(len(parts), 0, -1)
                 if ".".join(parts[:end]) in modules), None)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the nodes under an ``if TYPE_CHECKING:`` (not its ``else``)."""
    blocks = [node for node in ast.walk(tree) if isinstance(node, ast.If)
              and (getattr(node.test, "id", None) == "TYPE_CHECKING"
                   or getattr(node.test, "attr", None) == "TYPE_CHECKING")]
    return {id(inner) for block in blocks for statement in block.body
            for inner in ast.walk(statement)}


def _imports(module: str, path: Path, modules: Collection[str]) -> dict[str, bool]:
    """The modules of the three trees that the module at ``path`` imports, anywhere in it.

    Args:
        module: its installed name.
        path: its source file.
        modules: every module's name.

    Returns:
        Imported module -> whether an import of it runs (False when every import of it is
        under ``if TYPE_CHECKING:``); ``module`` itself left out.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = _type_checking_only(tree)
    found: dict[str | None, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [_deepest(alias.name, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from this module's package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *filter(None, [node.module])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                       else _deepest(base, modules) for alias in node.names]
        else:
            continue
        for target in targets:
            found[target] = found.get(target, False) or id(node) not in type_only
    return {name: runs for name, runs in found.items() if name is not None and name != module}


def import_graph(running_only: bool = False) -> dict[str, set[str]]:
    """Importer -> the modules of the three trees it imports.

    Args:
        running_only: leave out the imports under ``if TYPE_CHECKING:``.

    Returns:
        The graph, with every module as a key.
    """
    modules = _modules()
    return {name: {target for target, runs in _imports(name, path, modules).items()
                   if runs or not running_only}
            for name, path in modules.items()}


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the layer holding ``module``.

    Raises:
        LookupError: no pattern matches (a module outside the three trees).
    """
    matches = [(len(pattern), index) for index, (_, patterns) in enumerate(LAYERS)
               for pattern in patterns
               if module == pattern or (pattern.endswith(".*")
                                        and module.startswith(pattern[:-1]))]
    if not matches:
        raise LookupError(f"{module} is in no layer")
    return max(matches)[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each
    sorted: every module of one imports every other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_imports_point_down() -> None:
    """No module imports a module of a higher layer."""
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in sorted(import_graph().items()) for b in sorted(targets)
              if layer_of(b) > layer_of(a)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    """No modules import each other, directly or through others (the imports inside
    functions count: they still tie the modules together)."""
    graph = import_graph(running_only=True)
    found = ["; ".join(f"{a} -> {b}" for a in component for b in sorted(graph[a])
                       if b in component) for component in _cycles(graph)]
    assert not found, "import cycles (the edges within each):\n" + "\n".join(found)
