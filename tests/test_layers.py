"""The layers of ``omni_train/`` (docs/architecture.md): no import runs upwards, no circles, and
every import inside a function says why (``# lazy:``). The table in the doc is the rule; this
test reads it, so the doc and the code cannot drift apart."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "omni_train"
DOC = REPO / "docs" / "architecture.md"
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([\w_]+)`\s*\|[^|]*\|([^|]*)\|\s*$")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. omni_train.stage.runner
    target: str  # imported module (a submodule when the name imported is one)
    line: int
    lazy: bool  # inside a function
    reasoned: bool  # a "# lazy:" comment on the line or the comment block above it


def read_layers(doc: Path = DOC) -> dict[str, tuple[int, set[str]]]:
    """{unit: (layer, units it may import)} from the doc's table."""
    layers = {}
    for line in doc.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            layers[m[2]] = (int(m[1]), set(re.findall(r"`([\w_]+)`", m[3])))
    return layers


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(root: Path, dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    base = root / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _reasoned(lines: list[str], node: ast.stmt) -> bool:
    if "# lazy:" in lines[node.lineno - 1]:
        return True
    i = node.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        if "# lazy:" in lines[i]:
            return True
        i -= 1
    return False


def imports(root: Path = PACKAGE) -> list[Edge]:
    """Every import of ``root``'s own modules, from every module under ``root``. ``from pkg
    import sub`` is an edge to ``pkg.sub`` when ``sub`` is a module (as Python loads it)."""
    edges = []
    top = root.name
    for path in sorted(root.rglob("*.py")):
        source = _module_name(path, root)
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        in_function = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = source.split(".")
                    if path.name != "__init__.py":
                        base = base[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join([*base, *([module] if module else [])])
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.append(sub if _is_module(root, sub) else module)
            for target in dict.fromkeys(targets):
                if target == top or target.startswith(top + "."):
                    edges.append(
                        Edge(
                            source,
                            target,
                            node.lineno,
                            id(node) in in_function,
                            _reasoned(lines, node),
                        )  # fmt: skip
                    )
    return edges


def unit(module: str) -> str | None:
    """The layer unit of a module: ``omni_train.<unit>...``; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def units(root: Path = PACKAGE) -> set[str]:
    """The top-level modules and packages under ``root``."""
    modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    return modules | {p.parent.name for p in root.glob("*/__init__.py")}


def against_layers(edges: list[Edge], layers: dict[str, tuple[int, set[str]]]) -> list[str]:
    problems = []
    for e in edges:
        src, dst = unit(e.source), unit(e.target)
        if src is None or dst is None or src == dst:
            continue
        if dst not in layers[src][1]:
            problems.append(
                f"{e.source}:{e.line} imports {e.target}: layer {layers[src][0]} `{src}` may "
                f"import {sorted(layers[src][1]) or 'nothing'} (docs/architecture.md)"
            )
    return problems


def circles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def unreasoned_lazy(edges: list[Edge]) -> list[str]:
    return [f"{e.source}:{e.line} imports {e.target} inside a function without a '# lazy:' "
            "comment saying what it saves" for e in edges if e.lazy and not e.reasoned]  # fmt: skip


def test_the_table_declares_every_package_once_and_points_down():
    layers = read_layers()
    assert set(layers) == units(), "docs/architecture.md's table and omni_train/ differ"
    for name, (layer, allowed) in layers.items():
        for dep in allowed:
            assert dep in layers, f"`{name}` may import `{dep}`, which the table does not list"
            assert layers[dep][0] < layer, f"`{name}` (layer {layer}) may import `{dep}` above it"


def test_no_import_runs_against_the_layers():
    assert against_layers(imports(), read_layers()) == []


def test_no_circles_between_modules():
    assert circles(imports()) == []


def test_imports_inside_functions_say_what_they_save():
    assert unreasoned_lazy(imports()) == []


def test_the_checks_find_an_upward_import_a_circle_and_a_silent_lazy_import(tmp_path):
    # a package of three layers that breaks each rule once: the checks must name each break
    pkg = tmp_path / "omni_train"
    for name, text in {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "from omni_train.high import b\n",
        "high/__init__.py": "",
        "high/b.py": "from omni_train.low import a\n",
        "high/c.py": "def f():\n    from omni_train.low import a\n",
        "high/d.py": "def f():\n    # lazy: measured\n    from omni_train.low import a\n",
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    layers = {"low": (0, set()), "high": (1, {"low"})}
    edges = imports(pkg)
    assert units(pkg) == {"low", "high"}
    assert [p.split(" ")[0] for p in against_layers(edges, layers)] == ["omni_train.low.a:1"]
    assert circles(edges) == [["omni_train.high.b", "omni_train.low.a"]]
    assert [p.split(" ")[0] for p in unreasoned_lazy(edges)] == ["omni_train.high.c:2"]


@pytest.mark.parametrize("name", ["cli", "config", "checkpoint", "stage.launch", "model.count"])
def test_the_launchers_modules_import_no_torch(name):
    # the front door's pre-flight runs in one light process: torch and megatron-core load only
    # in the ranks and the tools (the reason for the `# lazy:` imports above)
    code = (
        f"import sys, omni_train.{name}; "
        "assert 'torch' not in sys.modules, [m for m in sys.modules if 'torch' in m][:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_no_module_is_over_600_lines():
    # a module that grows past this holds more than one thing: split it by what it owns
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}  # fmt: skip
    assert long == {}
