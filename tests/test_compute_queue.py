"""The server's compute thread: work in pieces, turns by compute time between peers, dropped when its caller goes
away, decode steps merged, errors to their own caller."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from swarm.server.compute import ComputeQueue, single


def pieces(log: list, name: str, count: int, seconds: float = 0.0, closed: list | None = None):
    def work():
        try:
            for index in range(count):
                time.sleep(seconds)
                log.append((name, index))
                yield
            return name
        finally:
            if closed is not None:
                closed.append(name)

    return work


def test_a_short_job_runs_between_the_pieces_of_a_long_one():
    log: list = []

    async def main():
        queue = ComputeQueue()
        try:
            long = asyncio.create_task(queue.run("alice", pieces(log, "long", 20, 0.005)))
            await asyncio.sleep(0.02)  # the long job is running
            assert await queue.run("bob", pieces(log, "short", 1)) == "short"
            done_at = len(log)
            assert await long == "long"
            return done_at
        finally:
            queue.stop()

    done_at = asyncio.run(main())
    # bob's one piece ran after at most one more piece of alice's, not after all 20
    assert log.index(("short", 0)) <= done_at and sum(1 for name, _ in log[:done_at] if name == "long") < 20


def test_a_job_whose_caller_went_away_is_dropped_and_closed():
    log, closed = [], []

    async def main():
        queue = ComputeQueue()
        try:
            task = asyncio.create_task(queue.run("alice", pieces(log, "long", 1000, 0.002, closed)))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)
            assert await queue.run("bob", single(lambda: 42)) == 42
            assert queue.pending == 0
        finally:
            queue.stop()

    asyncio.run(main())
    assert closed == ["long"] and len(log) < 1000


def test_an_error_goes_to_its_own_caller_only():
    def failing():
        yield
        raise ValueError("bad input")

    async def main():
        queue = ComputeQueue()
        try:
            bad = asyncio.create_task(queue.run("mallory", failing))
            good = asyncio.create_task(queue.run("alice", single(lambda: "fine")))
            with pytest.raises(ValueError, match="bad input"):
                await bad
            assert await good == "fine"
        finally:
            queue.stop()

    asyncio.run(main())


def run_queued_together(batch_runner, submit) -> list:
    """Hold a new queue's compute thread with a blocking job while ``submit(queue)`` queues its jobs (coroutines of
    ``queue.run``), so that they wait together and may be merged; then release the thread and return their results."""
    gate = threading.Event()

    async def main():
        queue = ComputeQueue(batch_runner=batch_runner)
        try:
            blocker = asyncio.ensure_future(queue.run("zed", single(gate.wait)))
            await asyncio.sleep(0.02)  # the thread is busy: the jobs below wait together
            jobs = [asyncio.ensure_future(job) for job in submit(queue)]
            await asyncio.sleep(0.02)
            gate.set()
            await blocker
            return await asyncio.gather(*jobs)
        finally:
            queue.stop()

    return asyncio.run(main())


def test_waiting_jobs_with_one_batch_key_run_merged():
    batches: list[list[str]] = []

    def runner(jobs):
        batches.append([job.payload for job in jobs])
        return [(job.payload.upper(), None) for job in jobs]

    results = run_queued_together(runner, lambda queue: [
        queue.run(peer, single(lambda: None), batch_key="decode", payload=peer) for peer in ("a", "b", "c")])
    assert results == ["A", "B", "C"]
    assert batches == [["a", "b", "c"]]


def test_turns_go_by_compute_time_so_a_flood_delays_a_short_job_by_one_piece():
    """Two peers queue many long jobs; a third peer's job of short pieces then runs right after the piece running
    now, all its pieces in a row (round-robin by count would put a flood piece between each of them)."""
    log: list = []

    async def main():
        queue = ComputeQueue()
        try:
            flood = [asyncio.create_task(queue.run(peer, pieces(log, f"{peer}{i}", 3, 0.03)))
                     for i in range(3) for peer in ("mallory", "trudy")]
            await asyncio.sleep(0.05)  # the flood is running
            arrived = len(log)
            assert await queue.run("alice", pieces(log, "alice", 5)) == "alice"
            await asyncio.gather(*flood)
            return arrived
        finally:
            queue.stop()

    arrived = asyncio.run(main())
    first = log.index(("alice", 0))
    assert first - arrived <= 1, log[arrived:first + 1]  # at most the piece that was running
    assert log[first:first + 5] == [("alice", i) for i in range(5)]


def test_predicted_costs_are_counted_while_jobs_wait_or_run():
    """What admission charges a peer (handler.py): its jobs' predicted seconds, let go when they end or drop."""
    async def main():
        queue = ComputeQueue()
        try:
            slow = asyncio.create_task(queue.run("alice", pieces([], "slow", 50, 0.002), cost=1.5))
            await asyncio.sleep(0.01)
            counted = queue.queued_cost.get("alice")
            await queue.run("alice", single(lambda: None), cost=0.5)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            await asyncio.sleep(0.05)
            return counted, queue.queued_cost
        finally:
            queue.stop()

    counted, left = asyncio.run(main())
    assert counted == 1.5 and left == {}


def threads_seen() -> tuple[int, int]:
    """torch's thread count in this thread, and MKL's (its own per-thread setting, which matmuls follow)."""
    from swarm.utils.threads import _mapped_library

    return torch.get_num_threads(), _mapped_library("libtorch_cpu").MKL_Get_Max_Threads()


@pytest.fixture
def two_torch_threads():
    """A process default of two torch threads (the tests run with one), which a new compute thread starts with."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_small_work_runs_on_the_compute_thread_alone_and_the_rest_on_the_pool(two_torch_threads):
    async def main():
        queue = ComputeQueue()
        try:
            return [await queue.run("alice", single(threads_seen), serial=serial) for serial in (True, False, True)]
        finally:
            queue.stop()

    assert asyncio.run(main()) == [(1, 1), (2, 2), (1, 1)]
    assert threads_seen() == (2, 2)  # the caller's thread keeps its setting


@pytest.mark.parametrize("jobs, expected", [(4, 1), (5, 2)])
def test_merged_small_steps_run_serially_up_to_four_rows(two_torch_threads, jobs, expected):
    seen: list[int] = []

    def runner(group):
        seen.append(threads_seen()[0])
        return [(len(group), None)] * len(group)

    results = run_queued_together(runner, lambda queue: [
        queue.run(f"peer{i}", single(lambda: 1), batch_key="step", serial=True) for i in range(jobs)])
    assert results == [jobs] * jobs  # merged into one call
    assert seen == [expected]
