"""The package as installed: every module is in a regular package (a wheel built by setuptools
leaves out directories without ``__init__.py``), and every ``>>>`` example in its docstrings
runs and prints what it shows."""

import doctest
import importlib
import os
import pkgutil

import pytest

import distload

ROOT = os.path.dirname(distload.__file__)
MODULES = sorted(m.name for m in pkgutil.walk_packages(distload.__path__, "distload."))


def test_every_directory_with_modules_is_a_regular_package():
    for directory, _, files in os.walk(ROOT):
        if "__pycache__" not in directory and any(f.endswith(".py") for f in files):
            assert "__init__.py" in files, f"{os.path.relpath(directory, ROOT)} would be missing from the wheel"
    assert "distload.checkpoint.header" in MODULES and "distload.quant.config" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
