"""A real server on an event-loop thread of the calling process: the same ``Server``, libp2p daemon, session loop
and compute thread as ``python -m swarm.server``, configured from the same command-line arguments, without the
Python start-up and imports (~6 s of CPU) of a process of its own.

For tests and tools that need many servers. What needs a process of its own (signals, SIGKILL, a crash, memory
measured per server) uses :class:`swarm.local_swarm.LocalSwarm`'s processes instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

from swarm.dht.schema import ServerState
from swarm.server.__main__ import build_config, build_parser
from swarm.server.server import Server
from swarm.utils.loop_thread import LoopThread
from swarm.utils.multiaddrs import peer_id_of


class InProcessServer:
    """``InProcessServer(["MODEL", "--blocks", "0:2", "--host", "127.0.0.1"]).wait_ready()``; ``stop()`` ends it."""

    def __init__(self, argv: list[str]):
        self.args = argv
        self.server = Server(build_config(build_parser().parse_args(argv)))
        self.thread = LoopThread(name="swarm-server-loop")
        self.future: concurrent.futures.Future = asyncio.run_coroutine_threadsafe(self.server.run(), self.thread.loop)
        self.maddr: str | None = None

    def wait_ready(self, timeout: float = 300) -> InProcessServer:
        deadline = time.monotonic() + timeout
        while self.maddr is None:
            if self.future.done():
                error = self.future.exception()
                raise RuntimeError(f"server {' '.join(self.args)} stopped before it was ready: {error!r}") from error
            if self.server.state is ServerState.ONLINE and self.server.maddrs:
                self.maddr = self.server.maddrs[0]
            elif time.monotonic() > deadline:
                raise TimeoutError(f"server {' '.join(self.args)} not ready in {timeout} s")
            else:
                time.sleep(0.05)
        return self

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.maddr)

    def output(self) -> str:
        """A process's log, for messages that quote it: an in-process server logs with the calling process."""
        return f"(server {' '.join(self.args)} runs in this process: its log lines are this process's)"

    @property
    def running(self) -> bool:
        return not self.future.done()

    def terminate(self) -> None:
        """What SIGTERM does to a server process: it announces itself offline and stops."""
        if self.thread.loop.is_running():
            self.thread.loop.call_soon_threadsafe(self.server.stopped.set)

    def stop(self, timeout: float = 15) -> None:
        self.terminate()
        try:
            self.future.result(timeout)
        except Exception:  # noqa: S110 - stopping: a failure was the caller's to see in wait_ready or a request
            pass
        self.thread.stop()
