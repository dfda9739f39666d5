"""One thread per process computes with torch in parallel; the helper threads around it run torch serially.

Why: with libgomp (the OpenMP runtime of torch's CPU wheels), every thread that enters a parallel region gets a
pool of worker threads of its own, and once a process holds more such threads than there are CPUs, libgomp stops
spin-waiting between parallel regions ("throttled" spinning). A decode step is hundreds of small parallel regions,
each then paying a futex wake-up: measured on a 2-core machine, 15 SmolLM2 layers took ~25 ms per decode step in a
thread of a process where a second thread had used torch, against ~20 ms with a single pool. A swarm process has
helper threads that touch tensors (the client's event loop encodes and decodes them; a server's event loop checks
requests), so they are made serial here, and the real compute stays on one thread: the caller's thread in a client,
the compute thread in a server.

Even that thread runs small work alone (``set_torch_threads_of_this_thread``, a per-thread setting): a decode step of
a few positions reads every weight for little arithmetic, so a pool gains ~2% alone, and where a client and servers
take turns on the same cores a pool's parallel region waits for a worker the scheduler gave to another process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@functools.cache
def _mapped_library(marker: str) -> ctypes.CDLL | None:
    """A shared library already mapped into this process whose path contains ``marker`` (torch loads its own
    libraries privately, so their symbols are not in the global namespace)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                if marker in path and path.startswith("/"):
                    return ctypes.CDLL(path)
    except OSError:
        pass
    return None


def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded, if it is libgomp."""
    return _mapped_library("libgomp")


@functools.cache
def _mkl_set_local() -> Callable[[int], int] | None:
    """MKL's per-thread thread count setter, which torch's CPU library exports (MKL is linked into it). The C
    entry point: the lower-case ``mkl_set_num_threads_local`` symbol is the Fortran one, which takes a pointer."""
    library = _mapped_library("libtorch_cpu")
    return getattr(library, "MKL_Set_Num_Threads_Local", None) if library is not None else None


def set_torch_threads_of_this_thread(threads: int) -> bool:
    """torch ops called from this thread use ``threads`` threads (its OpenMP and MKL settings), without touching
    the process-wide default that ``torch.set_num_threads`` also sets (which threads started later inherit).
    False where torch's OpenMP runtime is not libgomp: nothing was changed (MKL's setting is left as it is where
    torch does not export MKL's setter)."""
    import torch

    torch.get_num_threads()  # ATen's per-thread initialisation, which would reset what is set below on first use
    library, mkl = _libgomp(), _mkl_set_local()
    if library is None:
        return False
    library.omp_set_num_threads(threads)
    if mkl is not None:
        mkl(threads)
    return True


@contextlib.contextmanager
def torch_threads_of_this_thread(threads: int) -> Iterator[None]:
    """Within the block, torch ops called from this thread use ``threads`` threads; then its setting before."""
    import torch

    previous = torch.get_num_threads()
    if previous == threads or not set_torch_threads_of_this_thread(threads):
        yield
        return
    try:
        yield
    finally:
        set_torch_threads_of_this_thread(previous)


def run_torch_serially_in_this_thread() -> None:
    """torch ops in the calling thread run on it alone, never with an OpenMP pool of their own. Call it in a helper
    thread before it uses torch; other threads keep the process's setting."""
    if not set_torch_threads_of_this_thread(1):
        logger.debug("libgomp not found: helper threads keep torch's default thread count")


def call_in_serial_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a new thread whose torch ops run serially (e.g. loading weights while the compute thread serves);
    its result or exception."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            run_torch_serially_in_this_thread()
            result["value"] = fn()
        except BaseException as e:  # handed to the caller
            result["error"] = e

    thread = threading.Thread(target=target, name="serial-torch", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
