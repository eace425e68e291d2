"""No module of the package imports, directly or through others, a module that imports it back; and the baselines
never import the packages only the graph layers and comparisons need."""
import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_GPT_RUN
from gnngpt.cli import pyg_version
from gnngpt.mixers import pyg_nn

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gnngpt"


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


SCRIPTS_IN_TURN = """
import runpy, sys
for argv in sys.argv[1:]:
    sys.argv = argv.split()
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        assert not stop.code, (argv, stop.code)
print(sorted({name.split(".")[0] for name in sys.modules} & {"torch_geometric", "scipy"}))
"""


@pytest.mark.parametrize("script,imported", [("gpt.py", []), ("bigram.py", []), ("pyg-gpt.py", ["torch_geometric"])])
def test_the_baselines_train_sample_and_evaluate_without_importing_pyg_or_scipy(script, imported, tiny_text_file,
                                                                                 tmp_path):
    """PyG takes seconds to import (it imports torch._dynamo), scipy one: gpt.py and bigram.py, and sample.py and
    evaluate.py on their runs, start without them. pyg-gpt.py, which builds a PyG layer, shows the check sees it."""
    run = f"--out_dir {tmp_path / 'run'} --device cpu"
    sizes = TINY_GPT_RUN[:6] if script == "bigram.py" else TINY_GPT_RUN  # the bigram has no --n_embd and such
    train = f"{ROOT / script} {run} --data {tiny_text_file} --max_iters 2 --eval_interval 2 {' '.join(sizes)}"
    result = subprocess.run([sys.executable, "-c", SCRIPTS_IN_TURN, train, f"{ROOT / 'sample.py'} {run} "
                             "--max_new_tokens 5", f"{ROOT / 'evaluate.py'} {run} --batch_size 4"], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == repr(imported)


VERSION_LOOKUPS = """
import importlib.metadata, sys
from gnngpt.cli import pyg_version
read = pyg_version(), "torch_geometric" in sys.modules
def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)
importlib.metadata.version = missing  # as for a copy of PyG on PYTHONPATH, without its package metadata
print(repr((*read, pyg_version(), sys.modules["torch_geometric"].__version__)))
"""


def test_the_pyg_version_a_run_records_is_read_without_importing_pyg_and_imported_where_it_has_no_metadata():
    result = subprocess.run([sys.executable, "-c", VERSION_LOOKUPS], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from_metadata, imported, without_metadata, module_version = ast.literal_eval(result.stdout)
    assert (from_metadata, imported, without_metadata) == (module_version, False, module_version)


def test_the_pyg_version_is_the_imported_modules_where_a_pyg_layer_was_built(monkeypatch):
    pyg_nn()  # as building a PyG layer imports it
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0")  # another copy's metadata
    assert pyg_version() == sys.modules["torch_geometric"].__version__ != "0.0"
