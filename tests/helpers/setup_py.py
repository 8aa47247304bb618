"""What setup.py declares, read from its literals (the packaging and lock tests share it)."""

import ast
import os

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.common import REPO


def setup_keywords() -> dict:
    """The literal keywords of the setup() call in setup.py."""
    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    (call,) = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"
    ]
    return {
        k.arg: ast.literal_eval(k.value)
        for k in call.keywords
        if isinstance(k.value, ast.Constant | ast.List | ast.Dict)
    }


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(text).name) for text in requirements}
