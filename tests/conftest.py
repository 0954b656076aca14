"""Session-wide test settings that keep the suite's memory and time bounded on 2 cores.

* One torch thread in the pytest process. The tests' tensors are small, so a second
  intra-op thread buys little, and on a shared 2-core machine OpenMP's spinning workers
  turn every small op into a wait for a core (a test module measured ~25x slower under
  load with two threads than alone). Subprocesses (``fedmeta-simulate``, Ray actors,
  SuperNodes) choose their own thread counts as in production; nothing here reaches them.
* Freed memory goes back to the OS after every test. glibc keeps freed heap pages (every
  tensor under its 32 MB mmap threshold lives there), so after a test that built a
  ``base``-size model the pytest process stayed ~1 GB larger for the rest of the session,
  and the Flower/Ray tests that come later stacked their processes on top of it.
  ``malloc_trim`` costs well under a millisecond when there is nothing to give back.
* A garbage collection at the end of each module, for objects a module's fixtures left in
  reference cycles (models hold hooks that point back at them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import pytest
import torch


def _malloc_trim():
    """glibc's malloc_trim, or a no-op where the C library has none (macOS, musl)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    fn.argtypes = [ctypes.c_size_t]
    return lambda: fn(0)


_trim = _malloc_trim()


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _give_back_freed_memory():
    yield
    _trim()


@pytest.fixture(autouse=True, scope="module")
def _collect_module_garbage():
    yield
    gc.collect()
    _trim()
