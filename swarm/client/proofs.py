"""Challenged forwards: zero-knowledge proofs of sampled hops, fetched and checked after the reply.

With ``ClientConfig.zk_probability`` > 0, a forward hop is marked ``challenge: true`` with that probability. A
server started with ``--zk`` answers as usual and hands back a ticket; its proof is made afterwards (seconds to
minutes), so the client does not wait for it: ``ProofChecker`` fetches it in the background (the ``PROOF`` RPC) and
checks it against a circuit the client makes from its own copy of the checkpoint (so the verifying key commits to
the reference weights, not to whatever the server loaded), against the input the client sent and against the output
the server returned (swarm/trust/zk.py). A proof that fails, is malformed, does not come, or shows another output
strikes the server (its reputation drops; it is avoided) and is reported in ``results``; ``unsettled(peer)`` tells
settlement which servers still have proofs outstanding. The hop's output was already used: a failed proof is
evidence against the server, not a correction (a client that must not use unproven output awaits ``wait()``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from swarm.blocks.span import BlockSpan
from swarm.client.routing import RemoteSpan
from swarm.rpc import protocol
from swarm.rpc.client import PeerUnavailable, RemoteError, call

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProofResult:
    peer: str
    start: int
    end: int
    verified: bool
    reason: str  # why not (empty when verified)
    seconds: float  # from the reply to the verdict


class ProofChecker:
    FETCH_WAIT = 30.0  # one PROOF call waits this long on the server (it answers at once when the proof is made)

    def __init__(self, manager, source: object, directory: str | Path, srs_directory: str | Path | None = None,
                 max_wait: float = 900.0):
        self.manager, self.source, self.max_wait = manager, source, max_wait
        self.directory = Path(directory)
        self.srs_directory = Path(srs_directory) if srs_directory else self.directory
        self.results: list[ProofResult] = []
        self.errors: list[str] = []  # proofs this client could not check itself (no verdict on their servers)
        self.refused: list[tuple[str, str]] = []  # (peer, the server's reason) for challenges it would not prove
        self._tasks: set[asyncio.Future] = set()
        self._outstanding: dict[str, int] = {}
        self._modules: dict[tuple[int, int, int], torch.nn.Module] = {}
        self._worker = None  # the process keys are made and proofs checked in (ezkl holds the GIL)

    def track(self, span: RemoteSpan, reply: dict, inputs: torch.Tensor, output: torch.Tensor) -> None:
        """After a challenged hop's reply: fetch and check its proof in the background (on the client's loop)."""
        ticket = reply.get("proof_ticket")
        if not isinstance(ticket, str):
            reason = reply.get("proof_refused")
            self.refused.append((span.peer_id, reason if isinstance(reason, str) else "no ticket in the reply"))
            return
        self._outstanding[span.peer_id] = self._outstanding.get(span.peer_id, 0) + 1
        task = asyncio.ensure_future(self._check(span, ticket, inputs.detach().float(), output.detach().float()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, span: RemoteSpan, ticket: str, inputs: torch.Tensor, output: torch.Tensor) -> None:
        from swarm.blocks.provable import PROOF_SCALES
        from swarm.trust.zk import Circuit, ProofError, check_with

        started = time.monotonic()
        make = dict(srs_directory=str(self.srs_directory), scales=PROOF_SCALES)
        try:
            module = await asyncio.to_thread(self.reference, span.start, span.end, inputs.shape[1])
            # the client's keys are made (once per circuit) while the server proves
            ready = asyncio.ensure_future(self._in_worker(Circuit.make, module, tuple(inputs.shape),
                                                          str(self.directory), **make))
            try:
                blob = await self._fetch(span, ticket, started)
            finally:
                await ready
            await self._in_worker(check_with, module, tuple(inputs.shape), str(self.directory), blob, inputs, output,
                                  **make)
            verdict = (True, "")
        except (ProofError, RemoteError, PeerUnavailable, TimeoutError) as e:
            verdict = (False, str(e) or type(e).__name__)
        except Exception as e:  # the client's own failure (e.g. its worker died): no verdict on the server
            logger.warning(f"Could not check a proof of blocks {span.start}:{span.end}: {type(e).__name__}: {e}")
            self.errors.append(f"{type(e).__name__}: {e}")
            return
        finally:
            self._outstanding[span.peer_id] -= 1
        result = ProofResult(span.peer_id, span.start, span.end, *verdict, time.monotonic() - started)
        self.results.append(result)
        if not result.verified:
            logger.warning(f"Server {span.peer_id[-8:]} failed a proof of blocks {span.start}:{span.end}: "
                           f"{result.reason}")
            self.manager.strike(span.peer_id)

    async def _fetch(self, span: RemoteSpan, ticket: str, started: float) -> bytes:
        while time.monotonic() - started < self.max_wait:
            reply = await call(self.manager.p2p, span.peer_id, protocol.PROOF,
                               {"ticket": ticket, "wait": self.FETCH_WAIT},
                               timeout=self.FETCH_WAIT + self.manager.config.request_timeout)
            if isinstance(reply.get("proof"), bytes):
                return reply["proof"]
            if reply.get("pending") is not True:
                raise RemoteError(span.peer_id, "answered a proof request with neither a proof nor 'pending'")
        raise TimeoutError(f"no proof within {self.max_wait:.0f} s")

    def reference(self, start: int, end: int, tokens: int) -> torch.nn.Module:
        """Blocks [start, end) from the client's own checkpoint, as the circuit computes them on ``tokens``."""
        from swarm.blocks.provable import ProvableSpan

        key = (start, end, tokens)
        if key not in self._modules:
            self._modules[key] = ProvableSpan(BlockSpan.from_pretrained(self.source, start, end), tokens)
        return self._modules[key]

    async def _in_worker(self, function, *args, **kwargs) -> object:
        from functools import partial

        from swarm.trust.zk import worker

        self._worker = self._worker or worker()
        return await asyncio.get_running_loop().run_in_executor(self._worker, partial(function, *args, **kwargs))

    def shutdown(self) -> None:
        from swarm.trust.zk import stop_worker

        if self._worker is not None:
            stop_worker(self._worker)

    def unsettled(self, peer: str) -> bool:
        """Whether ``peer`` has challenged proofs not yet checked, or one that failed: its receipts wait."""
        return self._outstanding.get(peer, 0) > 0 or self.failed(peer)

    def failed(self, peer: str) -> bool:
        return any(r.peer == peer and not r.verified for r in self.results)

    async def wait(self) -> list[ProofResult]:
        """Every result, once the proofs in flight are checked."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        return list(self.results)
