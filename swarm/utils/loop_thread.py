"""An asyncio event loop in a daemon thread, so synchronous code (a PyTorch model) can await network calls."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
STOP_GRACE = 2.0  # s that cancelled tasks get to finish their cleanup when the loop stops


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
        """Cancel the loop's tasks (hivemind's DHT node runs some in the background), let them finish, then stop.

        Stopping at once would leave a cancelled task suspended in whatever cleanup takes it more than a turn of
        the loop: ``asyncio.wait_for`` waits for its inner future's cancellation, so a ``start_dht`` interrupted
        inside it never reached the code that ends the daemon it started (which then outlived the process)."""
        if not self.loop.is_running():
            return

        def _stop() -> None:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if not tasks:
                self.loop.stop()
                return

            async def finish() -> None:
                await asyncio.wait(tasks, timeout=STOP_GRACE)
                self.loop.stop()

            self.loop.create_task(finish())

        self.loop.call_soon_threadsafe(_stop)
        self.thread.join(timeout=STOP_GRACE + 5)
