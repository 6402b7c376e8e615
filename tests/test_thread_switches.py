"""Per-thread switches (roikit.utils.switches.ThreadSwitch) and the two that use it: ``jit.disabled()`` (the plain
path) and ``deterministic_backward()``; and the numba path's thread pool, which must run as many ranges at once
as torch has threads."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from roikit.ops import deterministic_backward, deterministic_backward_enabled
from roikit.ops.pytorch import jit
from roikit.utils.switches import ThreadSwitch


def _in_another_thread(fn):
    """fn() run in a fresh thread; its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def test_a_switch_is_set_for_its_block_and_its_thread():
    switch = ThreadSwitch()
    assert switch.on is False and ThreadSwitch(default=True).on is True
    with switch.set(True):
        assert switch.on is True
        assert _in_another_thread(lambda: switch.on) is False  # each thread has its own value
        with switch.set(False):  # blocks nest
            assert switch.on is False
        assert switch.on is True
    assert switch.on is False
    with pytest.raises(KeyError), switch.set(True):
        raise KeyError("the old value comes back after an exception too")
    assert switch.on is False


@pytest.mark.skipif(not jit.enabled(), reason="numba path off here (numba missing or ROIKIT_JIT=0)")
def test_jit_disabled_is_per_thread_and_nests():
    with jit.disabled():
        assert not jit.enabled()
        assert _in_another_thread(jit.enabled)
        with jit.disabled():
            assert not jit.enabled()
        assert not jit.enabled()
    assert jit.enabled()


def test_deterministic_backward_is_per_thread_and_nests():
    if torch.are_deterministic_algorithms_enabled():
        pytest.skip("torch.use_deterministic_algorithms(True) is in force: the switch cannot turn it off")
    assert not deterministic_backward_enabled()
    with deterministic_backward():
        assert deterministic_backward_enabled()
        assert not _in_another_thread(deterministic_backward_enabled)
        with deterministic_backward(False):
            assert not deterministic_backward_enabled()
        assert deterministic_backward_enabled()
    assert not deterministic_backward_enabled()


def _with_threads(threads: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def test_the_jit_pool_runs_one_thread_per_torch_thread_at_once():
    """More torch threads than CPUs (torch.set_num_threads takes any number): as many threads as torch has take
    pieces at the same time, each waiting in its first piece at a barrier for all the others (a pool sized by the
    CPUs would leave some queued: the barrier times out); every piece runs once, and together they cover 0 .. count."""
    threads = (os.cpu_count() or 1) + 2
    count = 10 * threads
    barrier = threading.Barrier(threads, timeout=20)
    seen, first = [], threading.local()

    def kernel(begin, end, tag):
        seen.append((begin, end, tag, threading.get_ident()))
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait()

    _with_threads(threads, lambda: jit._run(kernel, count, "x"))
    ranges = sorted((b, e) for b, e, tag, _ in seen)
    assert [b for b, _ in ranges] == [0] + [e for _, e in ranges[:-1]] and ranges[-1][1] == count
    assert {tag for *_, tag, _ in seen} == {"x"} and len({ident for *_, ident in seen}) == threads


def test_the_caller_does_not_wait_for_a_pool_thread_that_has_not_started():
    """Every pool thread held up (as by an OS that runs it late): the calling thread takes every piece and returns
    without waiting for the pool (before: it waited until a pool thread was free to find nothing left)."""
    threads = 3
    pool = jit._pool(threads - 1)
    release = threading.Event()
    holders = [pool.submit(release.wait, 30) for _ in range(threads - 1)]
    caller, seen = threading.get_ident(), []
    try:
        start = time.perf_counter()
        _with_threads(threads, lambda: jit._run(lambda b, e: seen.append((b, e, threading.get_ident())), 40))
        elapsed = time.perf_counter() - start
    finally:
        release.set()
        for h in holders:
            h.result()
    assert elapsed < 10  # the holders wait 30 s
    assert sorted((b, e) for b, e, _ in seen) == [(40 * i // 24, 40 * (i + 1) // 24) for i in range(24)]
    assert {ident for *_, ident in seen} == {caller}
