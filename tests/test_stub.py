"""The typed stub ``_native.pyi`` lists exactly what the compiled extension exports."""

from __future__ import annotations

import ast
from pathlib import Path

import pid_native
from pid_native import _native

STUB = Path(pid_native.__file__).with_name("_native.pyi")


def _public(names: list[str]) -> set[str]:
    return {n for n in names if not n.startswith("_") or n == "__version__"}


def test_stub_matches_the_extension() -> None:
    tree = ast.parse(STUB.read_text())
    top = {x.name for x in tree.body if isinstance(x, (ast.FunctionDef, ast.ClassDef))}
    top |= {x.target.id for x in tree.body if isinstance(x, ast.AnnAssign)}
    assert top == _public(dir(_native))
    for cls in (x for x in tree.body if isinstance(x, ast.ClassDef)):
        stubbed = {f.name for f in cls.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")}
        real = {n for n in dir(getattr(_native, cls.name)) if not n.startswith("_")}
        assert stubbed == real, cls.name
