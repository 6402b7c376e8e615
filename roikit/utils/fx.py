"""``torch.fx`` support: functions that stay one node of a traced graph."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.fx
from torch.fx.node import map_aggregate

__all__ = ["fx_leaf"]

F = TypeVar("F", bound=Callable[..., Any])


def fx_leaf(fn: F) -> F:
    """Make ``fn`` a leaf of ``torch.fx`` tracing wherever it is called from.

    ``torch.fx.wrap`` patches a function's name in its own module only; an op called from a user's module (or
    with a list of boxes) would be traced into, and its checks cannot read a Proxy. Called with a Proxy anywhere in
    its arguments, the decorated function records itself as one ``call_function`` node instead of running, as
    torchvision's wrapped ops do; called with tensors, it runs. torch.compile sees through it.
    """
    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        proxies: list[torch.fx.Proxy] = []
        map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, torch.fx.Proxy) else None)
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)

    return leaf  # type: ignore[return-value]
