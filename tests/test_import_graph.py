"""The import graph of kfac_hvd, launch and bench (the benchmarks), read from the sources (ast, nothing imported),
has no cycle; launch imports nothing inside a function but the heavy optional dependencies; the library
never imports the launcher.

An edge is every import a module can execute, those inside functions included (a cycle through a
lazy import is still a cycle); imports under ``if TYPE_CHECKING:`` never execute and are left out.
"""

from __future__ import annotations

import ast
import os
import shutil

from tests.helpers.common import REPO

PACKAGES = ("kfac_hvd", "launch", "bench")
# What launch may import inside a function: slow to import and needed by some runs only (a worker
# under mpirun, an ImageNet run, TensorBoard, --plot).
LAZY_ALLOWED = {
    "horovod.torch",
    "horovod.common.elastic",
    "horovod.common.exceptions",
    "mpi4py",
    "torchvision",
    "PIL",
    "torch.utils.tensorboard",
    "launch.record.plots",  # matplotlib
}


def module_files(root: str = REPO) -> dict[str, str]:
    """Dotted module name -> file, for the library, the launcher and the benchmarks."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(dirpath, name)
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: str) -> list[tuple[list[str], int, bool, int]]:
    """Every executable import: (the modules it may name, its relative level, inside a function, line).

    ``from pkg import name`` may name pkg.name (a submodule) or pkg (a name defined there): both are
    listed, and only those that are modules of ours become edges.
    """
    found: list[tuple[list[str], int, bool, int]] = []

    def visit(nodes: list[ast.AST], in_function: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking(node):
                visit(list(node.orelse), in_function)
                continue
            inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(node, ast.Import):
                found.extend(([a.name], 0, inner, node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                named = [f"{base}.{a.name}" if base else a.name for a in node.names]
                found.append(([base, *named] if base else named, node.level, inner, node.lineno))
            visit(list(ast.iter_child_nodes(node)), inner)

    with open(path, encoding="utf-8") as fh:
        visit([ast.parse(fh.read(), path)], False)
    return found


def resolve(name: str, level: int, importer: str, modules: dict[str, str]) -> str | None:
    """The module of ours that ``name`` (relative at ``level``) names from ``importer``, or None."""
    if level:
        parts = importer.split(".")
        if not modules[importer].endswith("__init__.py"):
            parts = parts[:-1]
        parts = parts[: len(parts) - (level - 1)]
        name = ".".join(parts + ([name] if name else []))
    return name if name in modules else None


def graph(root: str = REPO) -> dict[str, set[str]]:
    modules = module_files(root)
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {
            resolve(name, level, module, modules) for names, level, _, _ in imports(path) for name in names
        }
        edges[module] = {t for t in targets if t is not None and t != module}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert len(edges) > 80  # the walk found the packages and the benchmarks
    assert "launch.training.loop" in edges["launch.training.elastic"]  # a lazy-free edge is seen
    assert "bench._common" in edges["bench.step_cost"]  # the benchmarks are walked as a package
    assert cycles(edges) == []


def test_a_cycle_is_found(tmp_path):
    """The same walk over a copy of the sources with one import added back, inside a function:
    launch.store.checkpoint importing launch.store.convert, which imports it (a cycle the rooms removed)."""
    for folder in PACKAGES:
        shutil.copytree(
            os.path.join(REPO, folder), tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    with open(tmp_path / "launch" / "store" / "checkpoint.py", "a", encoding="utf-8") as fh:
        fh.write("\n\ndef _convert():\n    from launch.store.convert import main\n\n    return main\n")
    assert cycles(graph(str(tmp_path))) == [["launch.store.checkpoint", "launch.store.convert"]]


def test_launch_imports_inside_functions_only_the_heavy_optional_dependencies():
    modules = module_files()
    lazy = [
        f"{module}:{line} {names[-1]}"
        for module, path in sorted(modules.items())
        if module.startswith("launch")
        for names, _, inner, line in imports(path)
        if inner and not any(n == a or n.startswith(a + ".") for n in names for a in LAZY_ALLOWED)
    ]
    assert lazy == []


def test_the_library_never_imports_the_launcher():
    edges = graph()
    assert [
        m for m in edges if m.startswith("kfac_hvd") and any(t.startswith("launch") for t in edges[m])
    ] == []
