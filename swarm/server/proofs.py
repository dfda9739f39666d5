"""Zero-knowledge proofs of challenged forward requests (``--zk``), made after the reply and fetched later.

A client marks a forward request ``challenge: true``. If this server makes proofs and the request fits a circuit
(one sequence at positions 0..n-1, n <= ``max_positions``, no mask, prompts or adapter, float32 blocks), the reply
carries a ``proof_ticket``; otherwise a ``proof_refused`` reason (the forward itself is served either way). The
proof is made in a worker process (ezkl holds the GIL), one at a time, after the reply went out: proving takes
seconds to minutes (a circuit's keys, once per (blocks, positions), minutes, and hundreds of MB on disk each:
``--zk-max-positions`` bounds how many a client can make a server build). The client fetches it with the ``PROOF`` RPC
(``{"ticket": T, "wait": seconds}`` -> ``{"proof": bytes}``, ``{"pending": true}`` or an error) and checks it
against the input it sent, the output it got and a verifying key it made from its own copy of the weights
(swarm/trust/zk.py). Bounded: a few pending proofs per peer and in all, proofs kept for ``KEEP_SECONDS``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swarm.blocks.served import Bounds, ServedBlocks
from swarm.rpc.protocol import RequestError, get_field
from swarm.trust.faults import Faults

logger = logging.getLogger(__name__)
# What a server with the test fault "truncate-proof" sends (cut in half) instead of a proof it did not make.
UNPROVEN = b'{"instances": [["0000"]], "proof": "' + b"00" * 1024 + b'"}'


@dataclass
class Ticket:
    peer: str
    created: float
    done: asyncio.Event = field(default_factory=asyncio.Event)
    proof: bytes | None = None
    error: str | None = None


class Prover:
    MAX_PENDING_PER_PEER = 2
    MAX_PENDING = 8
    KEEP_SECONDS = 600.0
    MAX_WAIT = 60.0  # one PROOF call waits at most this long for a pending proof

    def __init__(self, directory: str | Path, srs_directory: str | Path | None = None, max_positions: int = 8,
                 faults: Faults | None = None):
        self.directory, self.max_positions = Path(directory), max_positions
        self.srs_directory = Path(srs_directory) if srs_directory else self.directory
        self.faults = faults or Faults()
        self.tickets: dict[str, Ticket] = {}
        self.executor = None  # the process proofs are made in (started at the first challenge)
        self.made = self.failed = 0  # shown by the server's info
        self._running: set[asyncio.Future] = set()
        # the restated layers of each served span (weakly: a span moved away by rebalancing is freed), per
        # (first, last, positions): built once, not at every challenge
        self._modules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ---- on a challenged forward

    def admit(self, peer: str, blocks: ServedBlocks, message: dict, bounds: Bounds) -> tuple | str:
        """What to prove for ``message`` (blocks, local first and last layer, the input), or why it cannot be."""
        self._expire()
        from swarm.blocks.provable import FAMILIES

        if getattr(blocks, "kind", None) != "span" or blocks.config.model_type not in FAMILIES:
            return f"proofs are made for decoder spans of {', '.join(FAMILIES)} models only"
        if message.get("prompts") is not None or message.get("active_adapter") is not None:
            return "proofs are made for the base blocks without deep prompts or adapters"
        try:
            first, last, hidden, positions, mask = blocks.read_inputs(message, bounds)
        except RequestError as e:  # the forward will refuse it with the same message
            return str(e)
        batch, tokens, _ = hidden.shape
        if batch != 1 or tokens > self.max_positions:
            return f"proofs are made for one sequence of at most {self.max_positions} positions"
        if not torch.equal(positions, torch.arange(tokens)[None]) or (mask is not None and not bool(mask.all())):
            return "proofs are made for positions 0..n-1 without padding"
        pending = [t for t in self.tickets.values() if not t.done.is_set()]
        if len(pending) >= self.MAX_PENDING or sum(t.peer == peer for t in pending) >= self.MAX_PENDING_PER_PEER:
            return "busy: too many proofs pending; challenge again later"
        return blocks, first, last, hidden.detach().float().clone()

    def submit(self, peer: str, job: tuple) -> str:
        """Start proving ``job`` (from ``admit``) after the reply; the ticket to fetch the proof with."""
        from swarm.trust.zk import worker

        ticket_id, ticket = secrets.token_hex(16), Ticket(peer, time.monotonic())
        self.executor = self.executor or worker()
        self.tickets[ticket_id] = ticket
        loop = asyncio.get_running_loop()

        async def prove() -> None:
            try:
                if self.faults.truncate_proof:  # sent cut in half anyway: a proof's ~40 s would buy nothing
                    ticket.proof = UNPROVEN
                else:
                    ticket.proof = await loop.run_in_executor(self.executor, self._work(*job))
                self.made += 1
            except Exception as e:  # a failure to prove is reported to the client, not raised in the server
                logger.warning(f"Could not make a proof: {type(e).__name__}: {e}")
                ticket.error = f"could not make the proof: {type(e).__name__}: {str(e)[:200]}"
                self.failed += 1
            ticket.done.set()

        task = asyncio.ensure_future(prove())
        self._running.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._running.discard)
        return ticket_id

    def _work(self, blocks: ServedBlocks, first: int, last: int, hidden: torch.Tensor) -> Callable[[], bytes]:
        """The worker's call: its circuit is of the layers as loaded here (so an edited weight is in it)."""
        from functools import partial

        from swarm.blocks.provable import PROOF_SCALES, ProvableSpan
        from swarm.trust.zk import prove_with

        modules = self._modules.setdefault(blocks, {})
        key = (first, last, hidden.shape[1])
        if key not in modules:
            modules[key] = ProvableSpan(blocks, hidden.shape[1], first, last)
        module = modules[key]
        return partial(prove_with, module, tuple(hidden.shape), str(self.directory), hidden,
                       srs_directory=str(self.srs_directory), scales=PROOF_SCALES)

    # ---- the PROOF RPC

    async def reply(self, peer: str, message: dict) -> dict:
        ticket_id = get_field(message, "ticket", str)
        wait = float(get_field(message, "wait", (int, float), 0.0))
        wait = min(max(wait, 0.0), self.MAX_WAIT) if math.isfinite(wait) else 0.0
        ticket = self.tickets.get(ticket_id)
        if ticket is None or ticket.peer != peer:
            raise RequestError("no such proof ticket here (unknown, someone else's, or expired)")
        if not ticket.done.is_set() and wait > 0:
            try:
                await asyncio.wait_for(ticket.done.wait(), wait)
            except TimeoutError:
                pass
        if not ticket.done.is_set():
            return {"pending": True}
        if ticket.error is not None:
            raise RequestError(ticket.error)
        return {"proof": self.faults.corrupt_proof(ticket.proof)}

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket_id, ticket in list(self.tickets.items()):
            if ticket.done.is_set() and now - ticket.created > self.KEEP_SECONDS:
                del self.tickets[ticket_id]

    def stats(self) -> dict:
        return {"made": self.made, "failed": self.failed,
                "pending": sum(not t.done.is_set() for t in self.tickets.values())}

    def shutdown(self) -> None:
        from swarm.trust.zk import stop_worker

        if self.executor is not None:
            stop_worker(self.executor)
