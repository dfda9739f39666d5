"""An asyncio event loop in a daemon thread, so synchronous code (a PyTorch model) can await network calls."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "swarm-client-loop"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if "torch" in sys.modules:  # it encodes and decodes tensors: serially, so the caller's compute keeps the
            from swarm.utils.threads import run_torch_serially_in_this_thread  # only OpenMP pool (see threads.py)

            run_torch_serially_in_this_thread()
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (cancelling it if ``timeout`` passes)."""
        if not self.thread.is_alive():
            coro.close()
            raise RuntimeError("this client was shut down")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        if not self.loop.is_running():
            return

        def _stop() -> None:
            for task in asyncio.all_tasks(self.loop):  # background tasks of hivemind's DHT node
                task.cancel()
            self.loop.call_soon(self.loop.stop)

        self.loop.call_soon_threadsafe(_stop)
        self.thread.join(timeout=5)
