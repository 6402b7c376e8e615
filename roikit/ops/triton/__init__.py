"""CUDA implementations of roikit's ops, written in Triton: one module per op family (kernels and launchers).

``roikit.ops._library`` registers them for CUDA tensors and imports them on the first CUDA call through
:func:`kernels`; this package imports neither Triton nor the plain-PyTorch kernels, so ``import roikit`` stays fast
and works without Triton or a GPU.

The kernel modules (one per op family: kernels and launchers) can also be called directly, on CUDA tensors or,
with ``TRITON_INTERPRET=1``, on CPU tensors: that is how the tests check them without a GPU.
"""
from __future__ import annotations

import importlib
from types import ModuleType

_modules: dict[str, ModuleType | None] = {}


def kernels(name: str) -> ModuleType | None:
    """The kernel module ``roikit.ops.triton.<name>``, or None when Triton cannot be imported."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            _modules[name] = None
    return _modules[name]
