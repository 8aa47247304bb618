"""setup.py's requirements against what the code imports: every third-party module that kfac_hvd, launch
or the tests import belongs to a distribution that setup.py declares where it is needed (the library's own
list for `import kfac_hvd`, [launch] for the launcher and the modelling tools, [test] for the tests).

The lists are read from setup.py's source, not from the installed metadata, which belongs to whichever
tree `pip install -e` last pointed at. Module names are mapped to distributions by the installed
packages' own records (importlib.metadata.packages_distributions: yaml -> PyYAML, PIL -> pillow).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.common import REPO
from tests.helpers.setup_py import names, setup_keywords

FIRST_PARTY = {"kfac_hvd", "launch"}
# Built against the installed torch by scripts/install_horovod.sh, so never a pip requirement.
NOT_FROM_PIP = {"horovod"}
# Imports that live in one distribution's modules but need another one installed.
NEEDS_ANOTHER = {"torch.utils.tensorboard": "tensorboard"}


def python_files(folder: str) -> list[str]:
    out = []
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        out += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return sorted(out)


def imports(paths: list[str], module_level_only: bool = False) -> dict[str, str]:
    """Absolute imports of the files (each module, its top-level package, and each name taken from a
    module as if it were a submodule) -> the first file that makes it. ``module_level_only``: only the
    imports that run when the module is imported, not those inside a function."""
    found: dict[str, str] = {}
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        nodes = ast.walk(tree)
        if module_level_only:
            nodes = _outside_functions(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for module in modules:
                for name in (module.split(".")[0], module):
                    found.setdefault(name, os.path.relpath(path, REPO))
    return found


def _outside_functions(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield child
            yield from _outside_functions(child)


def distributions(found: dict[str, str], local: set[str]) -> dict[str, str]:
    """The distributions the imports need (canonical name -> a file importing it), pip's modules only."""
    owners = md.packages_distributions()
    needed: dict[str, str] = {}
    for module, where in sorted(found.items()):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in FIRST_PARTY | NOT_FROM_PIP | local:
            continue
        extra = [
            dist
            for prefix, dist in NEEDS_ANOTHER.items()
            if module == prefix or module.startswith(prefix + ".")
        ]
        if "." in module and not extra:
            continue  # a submodule or an imported name: its top-level module is in `found` as well
        if top not in owners:
            pytest.fail(f"{where} imports {module}, which no installed distribution provides")
        for dist in extra or owners[top]:
            needed.setdefault(canonicalize_name(dist), where)
    return needed


def missing(needed: dict[str, str], declared: set[str]) -> list[str]:
    return [f"{dist} (imported by {where})" for dist, where in sorted(needed.items()) if dist not in declared]


KEYWORDS = setup_keywords()
LIBRARY = names(KEYWORDS["install_requires"])
EXTRAS = {extra: names(reqs) for extra, reqs in KEYWORDS["extras_require"].items()}


def test_importing_the_library_needs_only_its_own_requirements():
    needed = distributions(imports(python_files("kfac_hvd"), module_level_only=True), set())
    assert not missing(needed, LIBRARY)
    assert "torch" in needed  # the walk sees the library's imports at all


def test_the_launcher_and_the_modelling_tools_need_only_the_launch_extra():
    needed = distributions(imports(python_files("kfac_hvd") + python_files("launch")), set())
    assert not missing(needed, LIBRARY | EXTRAS["launch"])
    assert {"pyyaml", "tqdm", "tensorboard"} <= set(
        needed
    )  # the mapping reaches yaml, lazy imports, tensorboard


def test_the_tests_need_only_the_test_extra():
    local = {
        os.path.splitext(os.path.basename(p))[0] for p in python_files("tests") + python_files("scripts")
    }
    local |= {
        d for d in os.listdir(os.path.join(REPO, "tests")) if os.path.isdir(os.path.join(REPO, "tests", d))
    }
    local.add("tests")  # the tests import their helpers as the package tests.helpers
    needed = distributions(imports(python_files("tests")), local)
    assert not missing(needed, LIBRARY | EXTRAS["launch"] | EXTRAS["test"])
    assert {"pytest", "packaging"} <= set(needed)


def test_the_linters_of_make_lint_are_in_the_test_extra():
    with open(os.path.join(REPO, "Makefile")) as f:
        makefile = f.read()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    tools = set(re.findall(r"\$\(VENV\)/bin/(\w+)", lint))
    assert tools and tools <= EXTRAS["test"], tools


def test_the_venv_step_installs_the_lock_then_the_project_without_its_dependencies():
    with open(os.path.join(REPO, "Makefile")) as f:
        recipe = f.read().split("\n$(STAMP):", 1)[1].split("\n\n", 1)[0]
    lines = recipe.splitlines()
    installs = [line.split("pip install", 1)[1].split() for line in lines if "pip install" in line]
    # setup.py's lists reach the venv through the lock only (tests/scripts/test_lock.py: the lock covers them).
    assert installs == [["-q", "--no-deps", "--no-build-isolation", "-e", "."]], recipe
    steps = [
        next(i for i, l in enumerate(lines) if word in l)
        for word in ("lock.py install", "pip install", "lock.py check")
    ]
    assert steps == sorted(steps), recipe


def test_horovod_is_built_not_required():
    declared = LIBRARY.union(*EXTRAS.values())
    assert "horovod" not in declared
    assert "horovod" in imports(python_files("kfac_hvd")), (
        "the library no longer imports Horovod: drop NOT_FROM_PIP"
    )


def test_python_requires_matches_the_syntax_the_code_is_checked_for():
    with open(os.path.join(REPO, "ruff.toml")) as f:
        ruff_minor = re.search(r'target-version = "py3(\d+)"', f.read()).group(1)
    with open(os.path.join(REPO, "setup.cfg")) as f:
        mypy_minor = re.search(r"python_version = 3\.(\d+)", f.read()).group(1)
    assert KEYWORDS["python_requires"] == f">=3.{ruff_minor}" == f">=3.{mypy_minor}"


def test_the_installed_metadata_lists_setup_pys_requirements_when_it_is_this_tree():
    """What pip recorded when it installed this tree (make setup), against setup.py as it is now."""
    installs = [
        dist
        for dist in md.distributions()
        if canonicalize_name(dist.metadata["Name"] or "") == "kfac-hvd"
        and json.loads(dist.read_text("direct_url.json") or "{}").get("url") == f"file://{REPO}"
    ]
    if not installs:
        pytest.skip(f"kfac-hvd is not installed from {REPO} in this environment")
    for dist in installs:
        installed = {canonicalize_name(Requirement(r).name) for r in dist.requires or []}
        assert installed == LIBRARY.union(*EXTRAS.values()), "setup.py changed since `make setup`"
