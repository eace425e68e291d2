"""No module of the package imports, directly or through others, a module that imports it back."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gnngpt"


def imported_modules(path):
    """The gnngpt modules that the file at path imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .data import x
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import distributed
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("gnngpt."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("gnngpt."))
    return found


def import_graph():
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imported_modules(path) & set(modules) for name, path in modules.items()}


def find_cycle(graph):
    """One cycle of module names [a, b, ..., a] in graph, or None."""
    state = {}  # name -> "open" while on the path, "done" after

    def visit(name, path):
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                cycle = visit(other, path + [other])
                if cycle:
                    return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [name])
            if cycle:
                return cycle
    return None


def test_no_module_imports_a_module_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles_direct_and_through_others():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_import_graph_sees_relative_absolute_and_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from . import distributed\nfrom .data import x\nimport gnngpt.models\n"
                      "def f():\n    from .guard import check_layer\n", encoding="utf-8")
    assert imported_modules(module) == {"distributed", "data", "models", "guard"}
    assert import_graph()["models"] >= {"fast_gat", "mixers"}
