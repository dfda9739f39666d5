"""The server's one compute thread, shared fairly: work runs in pieces, and the peer that has used the least compute
goes next.

A piece of work is a generator function run on the compute thread: each ``yield`` is a point where other peers'
work may run (a transformer span yields after each layer, U-Net levels after each block), and its ``return``
value is the result. So a long request (a big prefill, a large image) holds the thread for at most one piece at a
time while others wait: a decode step queued behind it runs after the current piece, not after the whole request.

Turns are given by compute time, not by count (start-time fair queuing): each peer has a tag, the compute seconds it
has been given, and the waiting peer with the smallest tag runs next; a peer that starts waiting after being idle
(or a new identity) starts at the tag of the piece running now, so idleness saves no credit and new identities gain
nothing. A client decoding (short steps, idle in between) thus runs right after the current piece and keeps the
thread for its whole step, while peers sending long requests share what is left: a flood slows others by at most
one piece per request, not by its length.
A request whose caller has gone (its coroutine cancelled) is dropped at its next piece boundary; its generator is
closed, so its ``finally`` blocks undo partial work (e.g. a half-written KV cache).

Grad mode is per thread and would leak between interleaved generators at their ``yield``: every piece starts with
it off, and work that needs it (a backward pass) must not yield while it is on.

Small work (a decode step of a few rows) runs on the compute thread alone, without torch's OpenMP pool: it is bound
by reading the weights from memory, not by arithmetic, so a second thread gains ~2% alone and loses more where the
processes a step passes through (the next server, the client) take turns on the same cores: a pool waits for a
worker the scheduler gave to another process. SmolLM2, two servers and a client on a 2-core machine, the servers
with and without this, interleaved in one run: decode at 0.77x -> 0.86x the local model's speed.

Decode steps can also be merged: when the thread picks a job that has a ``batch_key``, it takes every other waiting
job with the same key (at the head of its peer's queue) and runs them as one call through ``batch_runner``
(batching.py), which gives each its own result.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.utils.threads import set_torch_threads_of_this_thread

logger = logging.getLogger(__name__)

Work = Callable[[], Generator[None, None, Any]]  # a generator function: yields between pieces, returns the result


@dataclass(eq=False)
class Job:
    peer: str
    work: Work
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    batch_key: object = None  # jobs with equal keys may run merged (decode steps), via ComputeQueue.batch_runner
    payload: object = None  # what the batch runner needs of this job (a DecodeStep)
    cost: float = 0.0  # what the caller estimated this job costs (seconds at the measured speed), for accounting
    serial: bool = False  # small enough to run best on the compute thread alone (see the module's docstring)
    generator: Iterator | None = field(default=None, repr=False)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # the compute thread's first piece of it
    seconds: float = 0.0  # compute thread time spent on it so far

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()


class ComputeQueue:
    """``await queue.run(peer, work)`` runs ``work`` on the compute thread and returns its result."""

    def __init__(self, name: str = "compute",
                 batch_runner: Callable[[list[Job]], list[tuple[Any, BaseException | None]]] | None = None,
                 max_batch: int = 32):
        self.batch_runner, self.max_batch = batch_runner, max(1, max_batch)
        self.lock = threading.Condition()
        self.queues: dict[str, deque[Job]] = {}  # per waiting peer, in the order they started waiting
        self.pending = 0  # jobs waiting or running: the server's announced load
        self.dropped = 0  # jobs dropped because their caller went away (shown by the server's info)
        self.busy_seconds: dict[str, float] = {}  # compute thread time by peer (bounded: see _account)
        self.tags: dict[str, float] = {}  # fair queuing: compute seconds each waiting or recent peer was given
        self.virtual = 0.0  # the tag of the piece running now: where a peer that starts waiting starts
        self.queued_cost: dict[str, float] = {}  # predicted seconds of each peer's jobs waiting or running
        self.stopped = False
        self.threads: int | None = None  # torch threads the compute thread runs with now (None: not yet known)
        self.pool_threads = 1  # the process's torch threads: what work that is not serial runs with
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, peer: str, work: Work, *, batch_key: object = None, payload: object = None,
               cost: float = 0.0, serial: bool = False) -> Job:
        """Queue ``work`` now, its ``cost`` counted in ``queued_cost`` at once: a caller that checked that cost
        (the handler's ``charge``) and submits without awaiting in between cannot be overtaken by another
        request's check. Await its result with :meth:`result`."""
        loop = asyncio.get_running_loop()
        job = Job(peer, work, loop, loop.create_future(), batch_key, payload, cost, serial)
        with self.lock:
            if self.stopped:
                raise RuntimeError("the compute thread is stopped")
            self._enqueue(job)
            self.pending += 1
            self.queued_cost[peer] = self.queued_cost.get(peer, 0.0) + cost
            self.lock.notify()
        return job

    async def result(self, job: Job, timing: dict | None = None) -> Any:
        """``job``'s result; ``timing`` (if given) gets ``queued`` (s until its first piece ran) and ``compute``
        (s of compute thread time it took; its share, when merged with others)."""
        try:
            return await job.future
        finally:
            if not job.future.done():  # the caller went away: the compute thread drops the job at its next piece
                job.future.cancel()
            if timing is not None and job.started is not None:
                timing.update(queued=job.started - job.submitted, compute=job.seconds)

    async def run(self, peer: str, work: Work, *, batch_key: object = None, payload: object = None,
                  cost: float = 0.0, serial: bool = False, timing: dict | None = None) -> Any:
        """``work``'s result (:meth:`submit`, then :meth:`result`)."""
        job = self.submit(peer, work, batch_key=batch_key, payload=payload, cost=cost, serial=serial)
        return await self.result(job, timing)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for queue in self.queues.values():
                for job in queue:
                    job.loop.call_soon_threadsafe(_cancel, job.future)
            self.queues.clear()
            self.lock.notify()

    def _enqueue(self, job: Job) -> None:
        """Append ``job`` to its peer's queue (under the lock); a peer that starts waiting gets its tag."""
        queue = self.queues.get(job.peer)
        if queue is None:
            queue = self.queues[job.peer] = deque()
            self.tags[job.peer] = max(self.tags.get(job.peer, 0.0), self.virtual)
        queue.append(job)

    # ---- on the compute thread

    def _next(self) -> list[Job] | None:
        """The next job of the waiting peer with the smallest tag (with the jobs it can merge with)."""
        with self.lock:
            while not self.stopped:
                for peer in list(self.queues):
                    queue = self.queues[peer]
                    while queue and queue[0].cancelled:
                        self._drop(queue.popleft())
                    if not queue:
                        del self.queues[peer]
                if not self.queues:
                    self.lock.wait()
                    continue
                peer = min(self.queues, key=self.tags.__getitem__)  # ties: the one waiting longest
                self.virtual = self.tags[peer]
                queue = self.queues[peer]
                job = queue.popleft()
                if not queue:
                    del self.queues[peer]
                group = [job]
                if job.batch_key is not None and job.generator is None and self.batch_runner is not None:
                    group += self._take_mergeable(job.batch_key)
                return group
            return None

    def _take_mergeable(self, key: object) -> list[Job]:
        taken = []
        for peer in list(self.queues):
            queue = self.queues[peer]
            while queue and len(taken) + 1 < self.max_batch and queue[0].batch_key == key and \
                    queue[0].generator is None and not queue[0].cancelled:
                taken.append(queue.popleft())
            if not queue:
                del self.queues[peer]
        return taken

    def _drop(self, job: Job) -> None:
        """A job whose caller went away: close its generator (its ``finally`` undoes partial work)."""
        if job.generator is not None:
            try:
                job.generator.close()
            except Exception:
                logger.debug("A dropped job failed while closing", exc_info=True)
        self.pending -= 1
        self.dropped += 1
        self._settle_cost(job)

    def _loop(self) -> None:
        self.threads = self.pool_threads = torch.get_num_threads()
        while True:
            group = self._next()
            if group is None:
                return
            if len(group) > 1:
                self._run_batch(group)
            else:
                self._step(group[0])

    def _step(self, job: Job) -> None:
        """Run one piece of ``job``; requeue it behind the other peers' work if it has more."""
        self._use_threads(1 if job.serial else self.pool_threads)
        started = time.perf_counter()
        if job.started is None:
            job.started = started
        # Grad mode is per thread: a piece that enabled it (a backward pass) must not leave it on for the next
        # job's piece, so every piece starts with it off and a backward pass runs as a single piece.
        torch.set_grad_enabled(False)
        try:
            if job.generator is None:
                job.generator = job.work()
            next(job.generator)
        except StopIteration as done:
            self._finish(job, started, done.value, None)
            return
        except BaseException as error:  # goes to this job's caller only
            self._finish(job, started, None, error)
            return
        elapsed = time.perf_counter() - started
        job.seconds += elapsed
        with self.lock:
            self._charge(job.peer, elapsed)
            if job.cancelled or self.stopped:
                self._drop(job)
            else:
                self._enqueue(job)

    def _run_batch(self, group: list[Job]) -> None:
        serial = len(group) <= self.SERIAL_ROWS and all(job.serial for job in group)
        self._use_threads(1 if serial else self.pool_threads)
        started = time.perf_counter()
        for job in group:
            job.started = started
        try:
            results = self.batch_runner(group)
        except BaseException as error:  # the runner gives each job its own error; this is a bug of the runner
            results = [(None, error)] * len(group)
        for job, (result, error) in zip(group, results, strict=True):
            self._finish(job, started, result, error, share=1 / len(group))

    SERIAL_ROWS = 4  # merged decode steps of up to this many serial jobs still run serially (measured: equal at 4)

    def _use_threads(self, threads: int) -> None:
        if threads != self.threads:
            set_torch_threads_of_this_thread(threads)
            self.threads = threads

    def _finish(self, job: Job, started: float, result: Any, error: BaseException | None, share: float = 1.0) -> None:
        elapsed = (time.perf_counter() - started) * share
        job.seconds += elapsed
        with self.lock:
            self.pending -= 1
            self._charge(job.peer, elapsed)
            self._settle_cost(job)
            self._account(job.peer, job.seconds)
        job.loop.call_soon_threadsafe(_resolve, job.future, result, error)

    def _charge(self, peer: str, seconds: float) -> None:
        """Advance ``peer``'s fair-queuing tag by the compute time it was just given (under the lock)."""
        self.tags[peer] = max(self.tags.get(peer, 0.0), self.virtual) + seconds
        if len(self.tags) > self.MAX_ACCOUNTS:  # peers that are not waiting and have no credit left to keep
            self.tags = {p: t for p, t in self.tags.items() if p in self.queues or t > self.virtual}

    def _settle_cost(self, job: Job) -> None:
        left = self.queued_cost.get(job.peer, 0.0) - job.cost
        if left > 1e-9:
            self.queued_cost[job.peer] = left
        else:
            self.queued_cost.pop(job.peer, None)

    MAX_ACCOUNTS = 10_000

    def _account(self, peer: str, seconds: float) -> None:
        self.busy_seconds[peer] = self.busy_seconds.get(peer, 0.0) + seconds
        if len(self.busy_seconds) > self.MAX_ACCOUNTS:  # many identities: keep the busiest half
            keep = sorted(self.busy_seconds.items(), key=lambda item: -item[1])[: self.MAX_ACCOUNTS // 2]
            self.busy_seconds = dict(keep)


def single(fn: Callable[[], Any]) -> Work:
    """A job of one piece: ``fn()`` on the compute thread."""

    def work() -> Generator[None, None, Any]:
        yield from ()  # a generator function that never yields: one piece
        return fn()

    return work


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _cancel(future: asyncio.Future) -> None:
    if not future.done():
        future.cancel()
