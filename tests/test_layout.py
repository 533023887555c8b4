"""The package layout keeps its promises (README "Where things live"):

- no import circles anywhere in ``cifar_flax`` (imports inside functions count too: a lazy
  import hides a circle from Python, not from a reader);
- nothing outside ``bench/``, ``analysis/`` and the top-level command-line modules imports
  ``bench/`` or ``analysis/`` (main.py hands the report to the loop as ``report_fn``);
- ``train`` and ``run/`` never import a command-line module, the layers they build on
  (``data/``, ``weights/``, ``models``, ``config``) never import them;
- at most 45 modules besides ``__init__``/``__main__``, no two with the same file name;
- imports at the top of modules: at most 25 inside functions in the package, each with a
  comment on its line or the line above saying why; no code above a module's imports (and no
  waiver comment for pycodestyle's E402) anywhere in the repository;
- the road in (README): at most 6 files and 1,600 lines from the train command to the update;
  no function in train.py with more than 6 parameters.

The import graph is read from the source with ``ast`` (nothing is imported), so the test is fast
and sees every import, including those behind ``if`` and inside functions.
"""

from __future__ import annotations

import ast
import re
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
    assert f"{PACKAGE}.weights.store" in graph[f"{PACKAGE}.run.model_setup"]
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
    bad = _offenders(graph, lambda m: not _in(m, "train", "run"), lambda t: t in clis)
    bad += _offenders(graph, lambda m: not _in(m, "data", "weights", "models", "config"),
                      lambda t: _in(t, "train", "run"))
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


def test_no_code_above_the_imports_and_no_e402_waiver(tmp_path):
    """Every module of the package, configs/, experiments/ and tests/ reads docstring,
    ``from __future__``, imports, code: nothing runs above an import (what a command does before
    its imports, the package's start-up does: run/startup.py), and no line waives the rule
    (flake8's E402). The check is shown to catch a planted offender."""
    waiver = "noqa: " + "E402"  # (Spelled apart: this file holds no waiver either.)
    import_types = (ast.Import, ast.ImportFrom)

    def code_above_imports(path: Path) -> list[str]:
        """``file:line`` of every statement above the module's last top-level import that is
        neither the docstring, an import, nor an ``if TYPE_CHECKING:`` block; and of a waiver."""
        source = path.read_text()
        body = ast.parse(source, str(path)).body
        imports = [i for i, node in enumerate(body) if isinstance(node, import_types)]
        out = [f"{path}:{n}" for n, line in enumerate(source.splitlines(), 1) if waiver in line]
        for i, node in enumerate(body[:imports[-1]] if imports else []):
            docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(
                node.value, ast.Constant) and isinstance(node.value.value, str)
            type_checking = isinstance(node, ast.If) and ast.unparse(node.test) in (
                "TYPE_CHECKING", "typing.TYPE_CHECKING")
            if not (docstring or type_checking or isinstance(node, import_types)):
                out.append(f"{path}:{node.lineno}")
        return out

    repo = ROOT.parent
    files = [p for folder in (PACKAGE, "configs", "experiments", "tests")
             for p in sorted((repo / folder).rglob("*.py"))]
    assert len(files) > 100 and repo / PACKAGE / "main.py" in files
    bad = [where for p in files for where in code_above_imports(p)]
    assert not bad, "code above an import (move it below the imports): " + ", ".join(bad)

    planted = tmp_path / "planted.py"
    planted.write_text('"""Doc."""\nfrom __future__ import annotations\n\nimport os\n\n'
                       'if TYPE_CHECKING:\n    import sys\nos.environ["X"] = "1"\nimport json\n')
    assert code_above_imports(planted) == [f"{planted}:8"]
    planted.write_text(f'import os\nimport json  # {waiver}\nX = 1\n')
    assert code_above_imports(planted) == [f"{planted}:2"]


REPO = ROOT.parent
ROAD_LINES, ROAD_FILES, HELPER_PARAMS = 1600, 6, 6


def road_in(readme: Path = REPO / "README.md") -> list[str]:
    """The files README "Where things live" names as the road in: the paragraph that starts
    "To follow one training step", its backquoted paths in reading order."""
    text = readme.read_text()
    start = text.index("To follow one training step")
    paragraph = text[start:text.index("\n\n", start)]
    return re.findall(r"`([\w/]+\.py)`", paragraph)


def test_the_road_in_is_six_files_and_1600_lines_from_the_command_to_the_update():
    """The README's road: at most 6 files, 1,600 lines in all (the number it states is the real
    one), from the train command (main.py hands the run to train.train_and_evaluate) through
    the config file of its README command to train.py, where the step is built;
    tests/test_train_step.py checks that tracing the step runs no other file of ours."""
    road = road_in()
    lines = {f: len((REPO / f).read_text().splitlines()) for f in road}
    total = sum(lines.values())
    assert len(road) <= ROAD_FILES and total <= ROAD_LINES, lines
    stated = re.search(r"read (\w+) files \(([\d,]+) lines", (REPO / "README.md").read_text())
    assert stated and int(stated.group(2).replace(",", "")) == total, (stated, total)
    assert road[:3] == ["cifar_flax/main.py", "configs/finetune.py", "cifar_flax/train.py"]
    main_tree = ast.parse((REPO / road[0]).read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == f"{PACKAGE}.train"
               and "train_and_evaluate" in [a.name for a in n.names]
               for n in ast.walk(main_tree)), "main.py must hand the run to train.py"


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return [n for n in names if n not in ("self", "cls")]


def wide_functions(path: Path, limit: int = HELPER_PARAMS) -> list[str]:
    """``name(count)`` of each function in ``path`` (nested ones included) with more than
    ``limit`` parameters (self and cls not counted)."""
    tree = ast.parse(path.read_text())
    return [f"{n.name}({len(_parameters(n))})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and len(_parameters(n)) > limit]


def test_train_py_helpers_receive_at_most_six_parameters():
    """Helpers receive what they use, not the loop's every variable."""
    assert wide_functions(ROOT / "train.py") == []


def test_the_road_and_parameter_checks_catch_a_violation(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("x\n\nTo follow one training step read (`a/b.py` -> `c.py`).\n\nmore `d.py`\n")
    assert road_in(readme) == ["a/b.py", "c.py"]
    wide = tmp_path / "wide.py"
    wide.write_text("def f(a, b, c, d, e, f, g):\n    def step(self, x):\n        pass\n")
    assert wide_functions(wide) == ["f(7)"]
