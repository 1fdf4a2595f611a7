"""The import graph: one direction through the layers, and no circles.

Each layer imports only the layers below it, so each folder can be tested without the
ones above: records (`state`), model maths (`models`), file formats (`runner.formats`),
the device side (`runner.device`), the engine side (`runner.engine`), the public API
(`runner`), benchmarks. Imports under `if TYPE_CHECKING:` are types only and not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("state", "models", "runner.formats", "runner.device", "runner.engine", "runner", "benchmarks")


def _layer(module: str) -> int:
    """The layer of the most specific package holding `module` (`runner.engine.x` is in
    `runner.engine`, not in `runner`)."""
    holding = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return LAYERS.index(max(holding, key=len))


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of the project that `path` imports at run time: `from pkg import x` imports
    the module `pkg.x` when there is one, else the package `pkg`."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return found & modules


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for top in ("state", "models", "runner", "benchmarks")
             for p in (ROOT / top).rglob("*.py")}
    return {m: _imports(p, set(files)) for m, p in files.items()}


def test_every_import_goes_down_the_layers() -> None:
    assert [_layer(m) for m in ("state.step", "runner.device.prepare", "runner.engine.scheduler",
                                "runner.llm")] == [0, 3, 4, 5]
    upward = sorted((m, i) for m, deps in _graph().items() for i in deps
                    if _layer(i) > _layer(m) and m != "runner.__main__")
    assert upward == []


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
