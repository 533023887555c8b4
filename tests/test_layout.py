"""The package layout keeps its promises (README "Where things live"):

- no import circles anywhere in ``cifar_flax`` (imports inside functions count too: a lazy
  import hides a circle from Python, not from a reader);
- nothing outside ``bench/``, ``analysis/`` and the top-level command-line modules imports
  ``bench/`` or ``analysis/`` (main.py hands the report to the loop as ``report_fn``);
- ``train`` and ``training/`` never import a command-line module, the layers they build on
  (``data/``, ``weights/``, ``models``, ``config``) never import them;
- at most 45 modules besides ``__init__``/``__main__``, no two with the same file name;
- imports at the top of modules: at most 25 inside functions in the package, each with a
  comment on its line or the line above saying why.

The import graph is read from the source with ``ast`` (nothing is imported), so the test is fast
and sees every import, including those behind ``if`` and inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "cifar_flax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every .py file of the package (``__init__`` = package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names a module imports (``from a import b`` gives ``a.b``; relative ones resolved)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(files: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """``{module: package modules it imports}``; ``from pkg import name`` counts as importing
    ``pkg.name`` when that is a module, else ``pkg``."""
    files = files if files is not None else module_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            if name in files:
                targets.add(name)
        graph[module] = targets - {module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def cli_modules(files: dict[str, Path] | None = None) -> set[str]:
    """Top-level modules that are command-line entry points (``if __name__ == "__main__"``)."""
    files = files if files is not None else module_files()
    return {
        m for m, p in files.items()
        if m.count(".") == 1 and '__name__ == "__main__"' in p.read_text()
    }


def _in(module: str, *packages: str) -> bool:
    return any(module == f"{PACKAGE}.{p}" or module.startswith(f"{PACKAGE}.{p}.")
               for p in packages)


def _offenders(graph: dict[str, set[str]], importer_ok, target_bad) -> list[str]:
    return sorted(f"{m} imports {t}" for m, ts in graph.items() if not importer_ok(m)
                  for t in ts if target_bad(t))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_graph_sees_the_package(graph):
    """The reader finds the modules and the imports the other checks rely on."""
    assert {f"{PACKAGE}.main", f"{PACKAGE}.train", f"{PACKAGE}.bench.__main__",
            f"{PACKAGE}.weights.store"} <= set(graph)
    assert f"{PACKAGE}.weights.store" in graph[f"{PACKAGE}.training.initialize"]
    assert f"{PACKAGE}.bench.frameworks" in graph[f"{PACKAGE}.bench.__main__"]
    assert {f"{PACKAGE}.main", f"{PACKAGE}.pretrained", f"{PACKAGE}.evaluate"} <= cli_modules()


def test_no_import_circles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import circles (break them by moving the shared piece down): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_nothing_in_the_library_imports_bench_or_analysis(graph):
    clis = cli_modules()
    bad = _offenders(graph, lambda m: _in(m, "bench", "analysis") or m in clis,
                     lambda t: _in(t, "bench", "analysis"))
    assert not bad, "the library must not import bench/ or analysis/: " + "; ".join(bad)


def test_train_and_its_layers_import_one_way(graph):
    clis = cli_modules()
    bad = _offenders(graph, lambda m: not _in(m, "train", "training"), lambda t: t in clis)
    bad += _offenders(graph, lambda m: not _in(m, "data", "weights", "models", "config"),
                      lambda t: _in(t, "train", "training"))
    assert not bad, "imports against the layer order: " + "; ".join(bad)


def test_few_modules_with_names_that_say_what_they_hold():
    files = [p for p in ROOT.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(files) <= 45, f"{len(files)} modules: merge the ones that hold one concept"
    names = [p.name for p in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"two modules with the same file name: {twice}"


def _imports_inside_functions(path: Path) -> list[tuple[int, bool]]:
    """(line, has a reason comment) of every import inside a function of ``path``."""
    source = path.read_text()
    lines = source.splitlines()
    out = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2]
                    out.append((node.lineno, "#" in here or "#" in above))
    return out


def test_imports_at_the_top_of_modules():
    found = {p: _imports_inside_functions(p) for p in ROOT.rglob("*.py")}
    total = sum(len(v) for v in found.values())
    assert total <= 25, f"{total} imports inside functions: move them to the top"
    unexplained = [f"{p.relative_to(ROOT)}:{n}" for p, v in found.items() for n, why in v
                   if not why]
    assert not unexplained, "imports inside functions without a reason: " + ", ".join(unexplained)


def test_checks_catch_a_circle_and_a_wrong_way_import(tmp_path):
    """The checker itself: a two-module circle through a lazy import and a relative import, and
    a library module importing bench/, are both found."""
    pkg = tmp_path / PACKAGE
    (pkg / "train").mkdir(parents=True)
    (pkg / "bench").mkdir()
    for init in (pkg, pkg / "train", pkg / "bench"):
        (init / "__init__.py").write_text("")
    (pkg / "train" / "a.py").write_text("from . import b\n")
    (pkg / "train" / "b.py").write_text("def f():\n    from cifar_flax.train import a\n")
    (pkg / "train" / "c.py").write_text("import cifar_flax.bench.timing\n")
    (pkg / "bench" / "timing.py").write_text("")
    g = import_graph(module_files(pkg))
    assert find_cycles(g) == [[f"{PACKAGE}.train.a", f"{PACKAGE}.train.b"]]
    bad = _offenders(g, lambda m: _in(m, "bench"), lambda t: _in(t, "bench"))
    assert bad == [f"{PACKAGE}.train.c imports {PACKAGE}.bench.timing"]
