"""Per-step timelines of an inference session: where a decode step's time goes.

``model.generate(..., trace=True)`` (or ``SWARM_TRACE=1`` in the environment, which also prints each generation's
timeline to stderr) records, for every step: the client's own compute since the previous step (embeddings, LM head,
sampling: what ``generate`` does between two calls into the swarm), the hand-over to the client's network thread,
encoding, and for each hop the time from sending its input (or from the previous hop's reply, when servers push)
to its reply, split into what the server reports of its own time (waiting for the compute thread, computing,
encoding its output) and the rest: transport through both libp2p daemons, framing and the server's event loop.
Server clocks are never compared with the client's: only durations measured on one machine are.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field


def enabled_by_env() -> bool:
    return os.environ.get("SWARM_TRACE", "").lower() not in ("", "0", "false", "no")


@dataclass
class HopTiming:
    peer: str
    blocks: tuple[int, int]
    waited: float = 0.0  # s from the moment its input could leave the client (or the previous reply) to its reply
    queue: float | None = None  # s the server's step waited for its compute thread (reported by the server)
    compute: float | None = None  # s of the blocks' compute (reported by the server)
    encode: float | None = None  # s to encode the output (reported by the server)
    pushed: bool = False  # its input came from the previous server directly
    # Clock readings (time.perf_counter): the client's, and the server's own (comparable only on one machine)
    sent_at: float | None = None  # the client sent this hop its input (None: pushed)
    replied_at: float | None = None  # its reply reached the client
    settled_at: float | None = None  # and its push status too (the client moves on to the next hop)
    server_received: float | None = None  # the step reached the server's session
    server_done: float | None = None  # its reply was ready to be written

    @property
    def server(self) -> float | None:
        if self.compute is None:
            return None
        return (self.queue or 0.0) + self.compute + (self.encode or 0.0)

    @property
    def transport(self) -> float | None:
        """What the client waited beyond the server's own time: network, daemons, framing, event loops."""
        server = self.server
        return None if server is None else max(0.0, self.waited - server)


@dataclass
class StepTiming:
    tokens: int  # new positions (per row)
    client_compute: float = 0.0  # s in the caller's thread since the previous step ended (head, sampling, embed)
    handoff: float = 0.0  # s from the call to the client's network thread starting on it
    encode: float = 0.0  # s to encode the step's input
    total: float = 0.0  # s from the call to the output back in the caller's thread
    hops: list[HopTiming] = field(default_factory=list)

    @property
    def other(self) -> float:
        """What is not accounted for: decoding the output, returning to the caller, bookkeeping."""
        return max(0.0, self.total - self.handoff - self.encode - sum(hop.waited for hop in self.hops))


@dataclass
class Trace:
    steps: list[StepTiming] = field(default_factory=list)
    _last_end: float | None = None

    def begin(self) -> tuple[StepTiming, float]:
        now = time.perf_counter()
        step = StepTiming(tokens=0, client_compute=0.0 if self._last_end is None else now - self._last_end)
        self.steps.append(step)
        return step, now

    def end(self, step: StepTiming, began: float) -> None:
        self._last_end = time.perf_counter()
        step.total = self._last_end - began

    def decode_steps(self) -> list[StepTiming]:
        """Steps of one new position after the first (the prefill and first step are in TTFT, not decoding)."""
        return [step for step in self.steps[1:] if step.tokens == 1]

    def summary(self) -> dict[str, float]:
        """Median milliseconds per decode step of each part (and ``step``: client compute + the step's total)."""
        steps = self.decode_steps()
        if not steps:
            return {}

        def median_ms(values: list[float | None]) -> float:
            present = [v for v in values if v is not None]
            return 1000 * statistics.median(present) if present else float("nan")

        result = {"step": median_ms([s.client_compute + s.total for s in steps]),
                  "client_compute": median_ms([s.client_compute for s in steps]),
                  "handoff": median_ms([s.handoff for s in steps]), "encode": median_ms([s.encode for s in steps]),
                  "other": median_ms([s.other for s in steps])}
        for index in range(len(steps[0].hops)):
            hops = [s.hops[index] for s in steps if len(s.hops) > index]
            for part in ("queue", "compute", "encode", "transport"):
                result[f"hop{index}_{part}"] = median_ms([getattr(hop, part) for hop in hops])
        return result

    def critical_path(self) -> dict[str, float]:
        """Median milliseconds of each segment of a decode step's path through the chain, from the clock readings
        of client and servers; empty unless they share one clock (all on one machine, e.g. a local benchmark).
        Segments: ``to hop i`` (client -> server, or the previous server's push), ``hop i in server`` (session
        loop and checks before compute), ``hop i queue/compute/encode``, and ``reply of hop i`` (server -> client)."""
        consistent = [step for step in self.decode_steps() if _same_clock(step)]
        if len(consistent) < max(1, len(self.decode_steps()) // 2):  # servers elsewhere, other clocks
            return {}
        segments: dict[str, list[float]] = {}
        for step in consistent:
            previous = None
            for index, hop in enumerate(step.hops):
                arrival = hop.server_received - (hop.sent_at if hop.sent_at is not None else previous.server_done)
                inside = hop.server_done - hop.server_received - hop.server
                for name, value in ((f"to hop {index}", arrival), (f"hop {index} in server", inside),
                                    (f"hop {index} queue", hop.queue), (f"hop {index} compute", hop.compute),
                                    (f"hop {index} encode", hop.encode),
                                    (f"reply of hop {index}", hop.replied_at - hop.server_done)):
                    segments.setdefault(name, []).append(1000 * value)
                previous = hop
        return {name: statistics.median(values) for name, values in segments.items()}

    def format(self) -> str:
        """A table of the median decode step, then the first few steps one by one."""
        lines = []
        summary = self.summary()
        if summary:
            lines.append(f"median decode step over {len(self.decode_steps())} steps: {summary['step']:.1f} ms")
            lines.append(f"  client compute (embeddings, head, sampling) {summary['client_compute']:6.1f} ms")
            lines.append(f"  hand-over to the network thread           {summary['handoff']:6.1f} ms")
            lines.append(f"  encode input                              {summary['encode']:6.1f} ms")
            index = 0
            while f"hop{index}_compute" in summary:
                lines.append(f"  hop {index}: queue {summary[f'hop{index}_queue']:5.1f}  compute "
                             f"{summary[f'hop{index}_compute']:5.1f}  encode {summary[f'hop{index}_encode']:5.1f}  "
                             f"transport {summary[f'hop{index}_transport']:5.1f} ms")
                index += 1
            lines.append(f"  decode output and return                  {summary['other']:6.1f} ms")
        path = self.critical_path()
        if path:
            lines.append("one clock on client and servers: each segment of the path, median ms")
            lines.extend(f"  {name:<22} {value:6.2f}" for name, value in path.items())
        for number, step in enumerate(self.steps[:4]):
            hops = ", ".join(f"{hop.peer[-6:]} {1000 * hop.waited:.1f} ms" + (" (pushed)" if hop.pushed else "")
                             for hop in step.hops)
            lines.append(f"step {number} ({step.tokens} tokens): {1000 * step.total:.1f} ms after "
                         f"{1000 * step.client_compute:.1f} ms of client compute: {hops}")
        return "\n".join(lines)

    def print(self) -> None:
        print(self.format(), file=sys.stderr, flush=True)


def _same_clock(step: StepTiming) -> bool:
    """Whether the servers' clock readings of ``step`` fit between the client's: one machine, one clock."""
    for index, hop in enumerate(step.hops):
        if None in (hop.server_received, hop.server_done, hop.replied_at, hop.compute):
            return False
        if hop.sent_at is None and index == 0:
            return False
        start = hop.sent_at if hop.sent_at is not None else step.hops[index - 1].server_done
        if start is None or not start <= hop.server_received <= hop.server_done <= hop.replied_at:
            return False
    return True
