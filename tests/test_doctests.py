"""The examples in mmspec's docstrings run, so they cannot drift from the code (doctest).

Every module of the package whose source holds a ``>>>`` example is imported and its examples executed; a
module without examples is not imported here (optional dependencies stay optional).
"""

import doctest
import importlib
import pathlib

import pytest

import mmspec

ROOT = pathlib.Path(mmspec.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = ("mmspec",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in ROOT.rglob("*.py") if ">>>" in p.read_text(encoding="utf-8"))


def test_examples_are_found():
    assert {"mmspec.acceptance", "mmspec.acceptance.base", "mmspec.kernels"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, capsys):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, capsys.readouterr().out
