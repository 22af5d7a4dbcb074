"""Layering: no module imports a layer above its own.

The layers and the modules in each are read from the table in docs/DESIGN.md (its one copy): a module missing
from it fails here, so the table stays true. Every import statement counts, function-level and `TYPE_CHECKING`
ones included: a lazy import is still a dependency.
"""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import freevlm

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md"


def layer_table() -> dict[str, int]:
    """`{"freevlm.x": rank}` from the rows of the table under "## Layers" (first row: rank 0, the lowest)."""
    section = DESIGN.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # header and rule
    table = {}
    for rank, row in enumerate(rows):
        for entry in re.findall(r"`([^`]+)`", row.split("|")[2]):
            name = entry.removesuffix("/").removesuffix(".py").replace("/", ".")
            table["freevlm" if name == "__init__" else f"freevlm.{name}"] = rank
    return table


def rank_of(module: str, table: dict[str, int]) -> tuple[str, int]:
    """The table entry a module or imported name falls under (the longest that names it or a package of it)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        entry = ".".join(parts[:n])
        if entry in table:
            return entry, table[entry]
    raise KeyError(module)


MODULE_NAME = re.compile(r"freevlm(\.\w+)+")


def imported(module, source: str) -> set[str]:
    """Absolute names of everything a module's source imports from freevlm (`from a import b` gives `a.b`), and
    in a module that calls `import_module`, every string that is a whole dotted `freevlm.` name: what it loads
    that way (the CLI's command table) is a dependency too."""
    package = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
    names = set()
    loads_by_name = "import_module" in source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names |= {f"{base}.{alias.name}" for alias in node.names}
        elif loads_by_name and isinstance(node, ast.Constant) and MODULE_NAME.fullmatch(str(node.value)):
            names.add(node.value)
    return {name for name in names if name.split(".")[0] == "freevlm"}


def all_modules() -> list:
    found = [importlib.import_module(info.name) for info in pkgutil.walk_packages(freevlm.__path__, "freevlm.")]
    return [freevlm, *found]


def test_every_module_has_a_layer():
    table = layer_table()
    assert len(set(table.values())) >= 6, f"docs/DESIGN.md's layer table not found or cut short: {table}"
    unlisted = [m.__name__ for m in all_modules() if rank_of(m.__name__, table)[0] == "freevlm" != m.__name__]
    assert not unlisted, f"modules without a layer in docs/DESIGN.md: {unlisted}"


def test_no_module_imports_a_layer_above_it():
    table = layer_table()
    upward = []
    for module in all_modules():
        entry, rank = rank_of(module.__name__, table)
        for name in sorted(imported(module, Path(module.__file__).read_text())):
            target, target_rank = rank_of(name, table)
            if target_rank > rank:
                upward.append(f"{module.__name__} ({entry}) imports {name} ({target})")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_relative_imports_resolve():
    """The resolver itself: relative levels, packages and function-level imports."""
    source = "from ..loading import a\nfrom . import b\ndef f():\n    from .c import d\n    import freevlm.model\n"
    assert imported(importlib.import_module("freevlm.demo.backbone"), source) == {
        "freevlm.loading.a",
        "freevlm.demo.b",
        "freevlm.demo.c.d",
        "freevlm.model",
    }
    assert imported(importlib.import_module("freevlm.data"), "from .coco import x\n") == {"freevlm.data.coco.x"}
    string_import = 'NAMES = ("freevlm.commands.demo", "see freevlm.model")\nimport_module(NAMES[0])\n'
    assert imported(importlib.import_module("freevlm.cli"), string_import) == {"freevlm.commands.demo"}
    assert imported(importlib.import_module("freevlm.cli"), 'log = getLogger("freevlm.training")\n') == set()


def import_graph() -> dict[str, set[str]]:
    """`{module: the freevlm modules it imports}`; `from a import b` counts as an import of `a.b` where that is a
    module, else of `a` (a package's `__init__` when `a` is one)."""
    modules = {m.__name__: m for m in all_modules()}
    graph = {}
    for name, module in modules.items():
        targets = set()
        for imported_name in imported(module, Path(module.__file__).read_text()):
            target = imported_name if imported_name in modules else imported_name.rpartition(".")[0]
            if target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    """No module imports itself through others, within a layer or across, lazy and TYPE_CHECKING imports counted:
    a circle is two modules that cannot be read (or loaded) one without the other."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
