"""A switch each thread sets for itself, for a ``with`` block: the numba path's ``jit.disabled()`` and the ops'
``deterministic_backward()`` are both one.

    _plain = ThreadSwitch()              # off unless set
    def disabled():
        return _plain.set(True)          # with disabled(): ... (this thread only; the old value comes back after)
    if _plain.on: ...
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["ThreadSwitch"]


class ThreadSwitch:
    """An on/off value per thread: ``default`` until :meth:`set` changes it for a block of that thread."""

    def __init__(self, default: bool = False) -> None:
        self._local = threading.local()
        self._default = bool(default)

    @property
    def on(self) -> bool:
        """This thread's value."""
        return getattr(self._local, "value", self._default)

    @contextlib.contextmanager
    def set(self, value: bool = True) -> Iterator[None]:
        """Make the switch ``value`` for this thread inside the ``with`` block, then put back what it was (blocks
        nest; an exception leaves the old value too)."""
        previous = self.on
        self._local.value = bool(value)
        try:
            yield
        finally:
            self._local.value = previous

    def __repr__(self) -> str:
        return f"ThreadSwitch(on={self.on}, default={self._default})"
