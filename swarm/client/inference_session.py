"""Streaming inference through a chain of servers, each keeping its part of the KV cache.

By default the servers push each step's output straight to the next server (the client names who follows whom);
each still answers the client, which keeps every hop's inputs. If a server dies, stalls or errs mid-session, its
blocks are routed to other servers and that history is replayed to them (one prefill), so generation continues
with the same output. Every step carries its start position, so a client can also rewind (regenerate from an
earlier point), and an id, so that a step both pushed and relayed runs once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time

import torch

from swarm.blocks import compat
from swarm.client.chain import Attempts, open_chain, output_codec
from swarm.client.config import ClientConfig
from swarm.client.hop_session import HopSession
from swarm.client.remote_forward import span_prompts
from swarm.client.routing import Hop, MissingBlocksError, RemoteSpan, RouteRequest
from swarm.client.sequence_manager import SequenceManager
from swarm.client.trace import HopTiming, StepTiming, Trace
from swarm.client.verification import Verdict, check_output
from swarm.compression import deserialize_tensor, serialize_tensor
from swarm.rpc.client import PeerUnavailable, RemoteError
from swarm.rpc.protocol import PUSH_TIMEOUT

logger = logging.getLogger(__name__)


class InferenceSession:
    """``with remote.inference_session(max_length=...) as session: session.step(hidden, position_ids, mask)``."""

    def __init__(self, manager: SequenceManager, max_length: int, config: ClientConfig | None = None,
                 blocks: tuple[int, int] | None = None, adapter: str | None = None):
        self.manager, self.max_length = manager, max_length
        self.adapter = adapter  # the LoRA adapter every server of the session applies (None: the base model)
        # This request's settings: the model's config, or a copy with other switches (an acceleration method's),
        # which stays with this session and never changes what other sessions use.
        self.config = config if config is not None else manager.config
        # The blocks it runs: from the first one not on the client (the model's, or its settings') to the last; or
        # the ``blocks`` of a slice of the remote layers (``model.model.layers[3:6]``).
        self.first_block = manager.first_block if config is None else config.local_blocks
        self.end_block = manager.num_blocks
        if blocks is not None:
            self.first_block, self.end_block = blocks
        self.local_span = None  # set by the model when this session keeps a different number of blocks locally
        self._position = 0  # positions every server has cached
        self.tokens_sent = 0  # positions sent so far, replays and rewinds included (what the servers computed)
        self.batch_size: int | None = None
        self.hops: list[HopSession] = []
        self.position_ids: torch.Tensor | None = None  # (batch, position) history, for replays
        self.attention_mask: torch.Tensor | None = None  # (batch, position) history, for replays
        self.token_ids: torch.Tensor | None = None  # kept by the causal LM to detect rewinds and beam reorders
        self.output_ids: torch.Tensor | None = None  # the last generate()'s sequences, its newest token not fed yet
        self.local_cache = None  # KV cache of the blocks the client runs itself (``local_blocks``)
        # A prompt-tuned model's prompt: the first ``prefix`` positions, which are not tokens of the history, and the
        # deep prompts (blocks, 1 or batch, prefix, hidden) its servers add to them (sent again with replays).
        self.prefix = 0
        self.prompts: torch.Tensor | None = None
        self._pending_hypo_ids: torch.Tensor | None = None
        self._step_ids = itertools.count()
        self.checks: list[Verdict] = []  # redundant checks run in this session
        self.trace: Trace | None = None  # set to record each step's timeline (trace.py)
        self.closed = False

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def chain(self) -> list[RemoteSpan]:
        return [hop.span for hop in self.hops]

    @property
    def position(self) -> int:
        """Positions every server has cached. Setting it (Petals' way to go back) is ``rewind``: the histories kept
        for replays and checks are cut too, not only the counter."""
        return self._position

    @position.setter
    def position(self, position: int) -> None:
        self.rewind(position)

    def rewind(self, position: int) -> None:
        """Forget positions from ``position`` on; the next step overwrites them on every server."""
        if not 0 <= position <= self._position:
            raise ValueError(f"cannot rewind to {position}: the session holds {self._position} positions")
        self._position = position
        self.output_ids = None  # generate(None) goes on from the history as rewound
        if position < self.prefix:  # into the prompt: a prompt-tuned model starts again from position 0 only
            self.prefix, self.prompts = 0, None
        for name in ("position_ids", "attention_mask"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[:, :position])
        if self.token_ids is not None:
            self.token_ids = self.token_ids[:, :max(0, position - self.prefix)]
        for hop in self.hops:
            if hop.inputs is not None:
                hop.inputs = hop.inputs[:, :position]
        if self.local_cache is not None:
            compat.truncate_cache(self.local_cache, position)

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        """Row i continues the hypothesis of row ``hypo_ids[i]`` (beam search); applied with the next step."""
        hypo_ids = hypo_ids.long()
        for name in ("position_ids", "attention_mask", "token_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[hypo_ids])
        for hop in self.hops:
            if hop.inputs is not None:
                hop.inputs = hop.inputs[hypo_ids]
        if self.local_cache is not None:
            compat.reorder_cache(self.local_cache, hypo_ids)
        previous = self._pending_hypo_ids
        self._pending_hypo_ids = hypo_ids if previous is None else previous[hypo_ids]

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run new positions (batch, tokens, hidden) through every block; returns the last block's output.

        ``attention_mask`` covers all positions so far plus the new ones (0 at padding), or is None. ``prompts``:
        deep prompts (one per block of the session, (blocks, 1 or batch, prompt length, hidden)) that the servers
        add to this step's first positions before each block: only with the session's first step.
        """
        if self.closed:
            raise RuntimeError("this inference session is closed")
        batch, tokens, _ = hidden.shape
        if prompts is not None:
            blocks = self.end_block - self.first_block
            if self.position != 0 or prompts.dim() != 4 or prompts.shape[0] != blocks \
                    or prompts.shape[2] > tokens or prompts.shape[1] not in (1, batch):
                raise ValueError(f"deep prompts go with a session's first step, shaped ({blocks}, 1 or {batch}, <= "
                                 f"{tokens}, hidden); got {tuple(prompts.shape)} at position {self.position}")
        if tokens == 0:  # nothing to compute: Petals accepts it too
            return hidden
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"the session was started with batch size {self.batch_size}, got {batch}")
        if self.position + tokens > self.max_length:
            raise ValueError(f"Maximum length exceeded (Petals' words): session max_length {self.max_length}, "
                             f"{self.position} positions cached, {tokens} more requested; open a session with a "
                             f"larger max_length")
        if attention_mask is not None and attention_mask.shape != (batch, self.position + tokens):
            raise ValueError(f"attention_mask must have shape ({batch}, {self.position + tokens}), "
                             f"got {tuple(attention_mask.shape)}")
        self.batch_size = batch
        timing, began = self.trace.begin() if self.trace is not None else (None, time.perf_counter())
        if timing is not None:
            timing.tokens = tokens
        if self.position == 0:  # (a first step that failed may have left another's)
            self.prompts = None if prompts is None else prompts.detach()
        output = self.manager.loop.run(self._step(hidden.detach(), position_ids.long(), attention_mask, timing,
                                                  began))
        if timing is not None:
            self.trace.end(timing, began)
        self._position += tokens
        self.tokens_sent += tokens
        self.position_ids = self._extend(self.position_ids, position_ids.long())
        if attention_mask is not None:
            self.attention_mask = attention_mask.long()
        elif self.attention_mask is not None:
            self.attention_mask = self._extend(self.attention_mask, torch.ones(batch, tokens, dtype=torch.long))
        return output

    @staticmethod
    def _extend(history: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if history is None else torch.cat([history, new], dim=1)

    async def _step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    timing: StepTiming | None = None, began: float = 0.0) -> torch.Tensor:
        if timing is not None:
            timing.handoff = time.perf_counter() - began
        if not self.hops:
            self.hops = await self._open_chain(self.first_block, self.end_block, upstream=None)
            await self._link()
        hypo_ids, self._pending_hypo_ids = self._pending_hypo_ids, None
        for _ in range(self.config.max_retries + 1):
            sent, received, output = await self._run_hops(hidden, position_ids, attention_mask, hypo_ids, timing)
            hypo_ids = None  # applied: a re-run of this step must not reorder the caches again
            liar = await self._verify(sent, received, position_ids, attention_mask)
            if liar is None:
                break
            logger.warning(f"Server {self.hops[liar].span} returned a wrong output; rebuilding the chain from it")
            await self._rebuild_from(liar)
        else:
            raise RuntimeError("redundant checks kept finding wrong outputs; giving up on this step")
        for hop, inputs in sent.items():
            hop.inputs = self._extend(hop.inputs, deserialize_tensor(inputs))
        return deserialize_tensor(output)

    async def _run_hops(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        hypo_ids: torch.Tensor | None, timing: StepTiming | None = None) -> tuple[dict, dict, dict]:
        """One pass of the step along the chain; returns what each hop was sent and answered, and the output."""
        config = self.config
        reordered_before = set(self.hops)  # replacement hops replay an already reordered history
        # a step with deep prompts is relayed by the client: each hop needs its own part of them
        step_id, push = next(self._step_ids), config.push and len(self.hops) > 1 and not self._prompted_step
        sent: dict[HopSession, dict] = {}  # recorded in the histories only once every hop succeeded
        received: dict[HopSession, dict] = {}
        encoding = time.perf_counter()
        payload = serialize_tensor(hidden, config.edge_codec)  # encoded once; servers' outputs travel as they are
        hop_timings: list[HopTiming] = []
        if timing is not None:
            timing.encode = time.perf_counter() - encoding
        await self._send(self.hops[0], payload, position_ids, attention_mask, hypo_ids, step_id, push)
        mark, pushed_in = time.perf_counter(), False
        sent_at: float | None = mark  # when the client sent the current hop its input (None: pushed to it)
        ready_at = mark  # when the current hop's input was ready (sent, or the previous hop's output came back)
        decode = hidden.shape[1] == 1
        attempts, index, relinked, rebuilt = Attempts(self.manager, config.max_retries), 0, False, set()
        while index < len(self.hops):
            hop = self.hops[index]
            started = time.perf_counter()
            # A step has a stall bound from the hop's own recent steps, or from its server's announced speed: a
            # frozen server, or one that never answers, is given up in seconds, not after request_timeout.
            bound = hop.stall_bound(config, hidden.shape[:2].numel(), decode)
            try:
                wait = max(0.05, bound - (started - ready_at))
                try:
                    reply = await hop.receive_step(step_id, wait, tokens=hidden.shape[:2].numel())
                except PeerUnavailable as e:
                    if bound < config.request_timeout and "did not answer" in str(e):
                        expected = (f"its recent steps took {max(hop.waits):.2f} s at most" if hop.waits else
                                    f"its announced speed predicts "
                                    f"{hop.claimed_seconds(hidden.shape[:2].numel(), decode):.2f} s")
                        raise PeerUnavailable(f"server {hop.span} stalled: no answer in {bound:.1f} s, where "
                                              f"{expected}", hop.span.peer_id) from e
                    raise
                replied_at = time.perf_counter()
                # The push status follows the reply once the next server took the step (or failed to).
                pushed = reply.get("pushing") and await hop.receive_push_status(step_id, bound + PUSH_TIMEOUT)
            except (PeerUnavailable, RemoteError) as e:
                if self.closed:  # its owner closed the streams under a step still running (Ctrl-C): not a fault
                    raise
                if isinstance(e, RemoteError) and compat.REWIND_REFUSED in str(e) and index not in rebuilt:
                    # An edited history reaches back past a sliding window the server already dropped: not a
                    # fault. A new session for these blocks gets the history the client kept, then the step.
                    rebuilt.add(index)
                    relinked = True
                    await self._replace_hop(index, ban=False)
                    await self._send(self.hops[index], payload, position_ids, attention_mask, None, step_id, False)
                    ready_at = time.perf_counter()
                    continue
                # A server that dies, stalls past the timeout or errs mid-generation is replaced; an error that
                # its replacement repeats on the same step is ours to report.
                attempts.failed(e)  # raised if the request is at fault or out of retries; the hop is banned below
                relinked = True
                logger.warning(f"Server {hop.span} failed ({e}); routing its blocks elsewhere and replaying")
                with self.manager.rerouting_after(e, hop.span.peer_id):
                    # a busy server (its memory taken back for someone else) did nothing wrong: not banned
                    await self._replace_hop(index, ban=not (isinstance(e, RemoteError) and e.busy))
                await self._send(self.hops[index], payload, position_ids, attention_mask, None, step_id, False)
                ready_at = time.perf_counter()
                continue
            if decode:  # (from its input being ready, relayed or pushed, to its reply)
                hop.waits.append(replied_at - ready_at)
                # what decode steps take beyond the expected network and announced compute: a server slower than it
                # claims costs more in routing from now on
                self.manager.record_hop_time(hop.hop, replied_at - ready_at)
            ready_at = replied_at
            if timing is not None:
                hop_timings.append(_hop_timing(hop, reply, mark, replied_at, sent_at if not pushed_in else None))
                mark = time.perf_counter()
            pushed_in, sent_at = pushed, None
            sent[hop], received[hop] = payload, reply["hidden"]
            payload = reply["hidden"]
            if index + 1 < len(self.hops) and not pushed:  # the client relays it
                next_hop = self.hops[index + 1]
                await self._send(next_hop, payload, position_ids, attention_mask,
                                 hypo_ids if next_hop in reordered_before else None, step_id, push)
                sent_at = time.perf_counter()
            index += 1
        if relinked:
            await self._link()
        if timing is not None:
            timing.hops = hop_timings
        return sent, received, payload

    async def _verify(self, sent: dict, received: dict, position_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> int | None:
        """Redundant checks of this step's hops, each with probability ``verify_probability``; the index of the
        first hop the check found wrong, if any."""
        probability = self.config.verify_probability
        for index, hop in enumerate(self.hops):
            if probability <= 0 or random.random() >= probability or hop not in sent:
                continue
            current = deserialize_tensor(sent[hop])
            inputs = current if hop.inputs is None else torch.cat([hop.inputs, current], dim=1)
            positions = position_ids if self.position_ids is None else torch.cat([self.position_ids, position_ids],
                                                                                   dim=1)
            mask = attention_mask
            if mask is None and self.attention_mask is not None:
                mask = self._extend(self.attention_mask, torch.ones_like(position_ids))
            verdict = await check_output(self.manager, hop.span, inputs, positions, mask,
                                         deserialize_tensor(received[hop]), hop.output_codec, self.adapter,
                                         self._prompts_of(hop))
            self.checks.append(verdict)
            if hop.span.peer_id in verdict.struck:
                return index
        return None

    async def _rebuild_from(self, index: int) -> None:
        """Replace hops ``index``.. (whose caches may hold a wrong output) by a new chain, replaying the history of
        hop ``index``'s inputs through it."""
        failed = self.hops[index]
        self.manager.ban(failed.span.peer_id)
        for hop in self.hops[index:]:
            await hop.close()
        del self.hops[index:]
        upstream = self.hops[index - 1].span.peer_id if index else None
        new = await self._open_chain(failed.span.start, self.end_block, upstream)
        await self._replay(new, failed.inputs)
        self.hops.extend(new)
        await self._link()

    async def _send(self, hop: HopSession, payload: dict, position_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None, hypo_ids: torch.Tensor | None, step_id: int,
                    push: bool) -> None:
        try:
            await hop.send_step(payload, position_ids, attention_mask, self.position, hypo_ids, step_id, push,
                                trace=self.trace is not None,
                                prompts=self._prompts_of(hop) if self._prompted_step else None)
        except PeerUnavailable:
            pass  # the broken stream shows when its reply is awaited, where failover happens

    @property
    def _prompted_step(self) -> bool:
        """Whether the step being sent carries deep prompts: the session has them and the step starts at 0."""
        return self.prompts is not None and self._position == 0

    def _prompts_of(self, hop: HopSession) -> torch.Tensor | None:
        """``hop``'s blocks' part of the session's deep prompts."""
        return span_prompts(hop.span, self.prompts, self.first_block)

    async def _link(self) -> None:
        """Tell every server of the chain whom it pushes to and whom it accepts pushes from."""
        if not self.config.push or len(self.hops) < 2:
            return
        timeout = self.config.request_timeout
        hops = self.hops
        await asyncio.gather(*(hop.link(hops[i + 1] if i + 1 < len(hops) else None, hops[i - 1] if i else None,
                                        timeout) for i, hop in enumerate(hops)))

    async def _open_chain(self, start: int, end: int, upstream: str | None) -> list[HopSession]:
        """Sessions on a chain covering blocks [start, end), the first accepting pushes from ``upstream``."""
        config = self.config
        # With push, links between servers cost the RTTs they announced (next_pings), not the client's.
        request = RouteRequest(mode="latency", batch_size=self.batch_size, max_length=self.max_length,
                               push=config.push, adapter=self.adapter)

        async def open_hop(hop: Hop, previous: HopSession | None) -> HopSession:
            return await HopSession.open(self.manager, hop, self.batch_size, self.max_length,
                                         output_codec(config, hop.span.end == self.end_block),
                                         previous.span.peer_id if previous else upstream, self.adapter)

        return await open_chain(self.manager, start, end, request, open_hop, config.routing_policy,
                                config.max_retries)

    async def _replace_hop(self, index: int, ban: bool = True) -> None:
        """Route the failed hop's blocks to other servers and replay its history there (one prefill each).
        ``ban=False``: the server did nothing wrong and may be chosen again (for a fresh session)."""
        started = time.perf_counter()
        failed = self.hops.pop(index)
        failed.stream.close()
        if ban:
            self.manager.ban(failed.span.peer_id)
        upstream = self.hops[index - 1].span.peer_id if index else None
        attempts = Attempts(self.manager, self.config.max_retries)
        while True:
            try:
                hops = await self._open_chain(failed.span.start, failed.span.end, upstream)
            except MissingBlocksError:
                # Keep the chain's shape: the next step finds the stream closed and tries again from the history.
                self.hops.insert(index, failed)
                raise
            try:
                await self._replay(hops, failed.inputs)
            except (PeerUnavailable, RemoteError) as e:
                for hop in hops:
                    await hop.close()
                attempts.failed(e, e.peer or hops[0].span.peer_id)
                logger.warning(f"Replay failed ({e}); choosing other servers")
                continue
            self.hops[index:index] = hops
            self.manager.record_failover_time(time.perf_counter() - started)
            return

    async def _replay(self, hops: list[HopSession], history: torch.Tensor | None) -> None:
        """Rebuild the replacement hops' caches: the first gets the lost hop's inputs exactly (uncompressed)."""
        if history is None or self.position == 0:
            return
        mask = self.attention_mask[:, : self.position] if self.attention_mask is not None else None
        payload = serialize_tensor(history, "none")
        positions = history.shape[:2].numel()
        for hop in hops:
            step_id = next(self._step_ids)
            await hop.send_step(payload, self.position_ids, mask, 0, None, step_id, push=False,
                                prompts=self._prompts_of(hop))
            timeout = hop.stall_bound(self.config, positions, decode=False)
            output = (await hop.receive_step(step_id, timeout, tokens=positions))["hidden"]
            hop.inputs = deserialize_tensor(payload)
            payload = output

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        async def _close_all() -> None:
            for hop in self.hops:
                await hop.close()

        try:
            self.manager.loop.run(_close_all(), timeout=10)
        except Exception:
            logger.debug("Failed to close an inference session cleanly", exc_info=True)
        self.hops = []


def _hop_timing(hop: HopSession, reply: dict, since: float, replied_at: float, sent_at: float | None) -> HopTiming:
    """How long the client waited for ``hop``'s reply since ``since``, with the server's own account of it;
    ``sent_at``: when the client sent the hop its input (None: the previous server pushed it)."""
    timing = HopTiming(hop.span.peer_id, (hop.span.start, hop.span.end), replied_at - since, pushed=sent_at is None,
                       sent_at=sent_at, replied_at=replied_at, settled_at=time.perf_counter())
    reported = reply.get("timing")
    if isinstance(reported, list) and len(reported) == 5:
        numbers = [float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None for x in reported]
        timing.queue, timing.compute, timing.encode, timing.server_received, timing.server_done = numbers
    return timing
