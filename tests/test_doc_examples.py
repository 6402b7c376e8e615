"""The examples written in roikit's docstrings run here, so the docs cannot drift from the code."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["roikit.layers.basic_pool", "roikit.layers.stochastic_pool", "roikit.ops.geometry"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
