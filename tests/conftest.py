"""Test-wide setup.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the CUDA kernels on CPU tensors. Triton reads the variable when
a kernel module is imported, and any test may import roikit's kernel modules first, so it is set here, before
the test modules are collected. Tests that need the real compiler remove it for their subprocess.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
