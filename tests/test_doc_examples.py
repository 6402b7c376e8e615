"""The examples written in roikit's docstrings run here, so the docs cannot drift from the code."""
from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

MODULES = ["roikit.layers.basic_pool", "roikit.layers.stochastic_pool", "roikit.ops.geometry"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


README = Path(__file__).parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("index", range(len(_python_blocks(README.read_text()))))
def test_readme_python_blocks_run(index, tmp_path, monkeypatch):
    """Every ```python block of the README runs as written (in a scratch folder)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_blocks(README.read_text())[index], f"README.md block {index}", "exec"), {})
