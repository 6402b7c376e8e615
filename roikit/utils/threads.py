"""One ``--threads`` convention for every tool: ``--threads N`` sets torch's CPU threads; left out, torch keeps its
own default (all cores)."""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

__all__ = ["add_threads_argument", "torch_threads", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse ``type``: the int ``text`` spells when it is >= 1 (else argparse's one-line usage error)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def add_threads_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--threads N`` on ``parser`` (``args.threads``: an int >= 1, or None for torch's default); ``note`` is
    added to its help (say when a tool runs faster on fewer threads)."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help=f"CPU threads for torch (default: torch's own, all cores){'; ' + note if note else ''}")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: leave them), and restore the previous setting after it,
    so a tool's ``main`` can run inside another program (the tests) without changing it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
