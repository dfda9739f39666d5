"""One thread per process computes with torch in parallel; the helper threads around it run torch serially.

Why: with libgomp (the OpenMP runtime of torch's CPU wheels), every thread that enters a parallel region gets a
pool of worker threads of its own, and once a process holds more such threads than there are CPUs, libgomp stops
spin-waiting between parallel regions ("throttled" spinning). A decode step is hundreds of small parallel regions,
each then paying a futex wake-up: measured on a 2-core machine, 15 SmolLM2 layers took ~25 ms per decode step in a
thread of a process where a second thread had used torch, against ~20 ms with a single pool. A swarm process has
helper threads that touch tensors (the client's event loop encodes and decodes them; a server's event loop checks
requests), so they are made serial here, and the real compute stays on one thread: the caller's thread in a client,
the compute thread in a server.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (the one already mapped into this process), if it is libgomp."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if line.strip() else ""
                if "libgomp" in path and path.startswith("/"):
                    return ctypes.CDLL(path)
    except OSError:
        pass
    return None


def run_torch_serially_in_this_thread() -> None:
    """torch ops in the calling thread run on it alone, never with an OpenMP pool of their own. Call it in a helper
    thread before it uses torch; other threads keep the process's setting."""
    import torch

    torch.get_num_threads()  # ATen's per-thread initialisation, which would reset what is set below on first use
    library = _libgomp()
    if library is not None:
        library.omp_set_num_threads(1)
    else:
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
