"""Decode steps of several inference sessions run as one call of the span.

A decode step (one new token per row) costs about the same whether it carries one row or a dozen: the time goes
into reading the layers' weights, not into the arithmetic. So when several sessions' decode steps are waiting for
the compute thread at once, they run together: their hidden states are stacked along the batch, their KV caches are
copied, left-padded to the longest, into one temporary cache, the padding is masked out, and each session gets back
its own rows of the output and has its own cache grown by its new positions, exactly as if it had run alone.

No step waits for company: a step that finds the compute thread idle runs at once (alone); steps that arrive
while it is busy are collected and run as one batch when it frees up. Only steps that can be merged exactly are:
the same span object and layer range, one new token, no beam reorder, plain full-attention caches of one dtype.
Anything else, or a batch that fails, runs step by step as before, each error going to its own caller. Sessions
of very different lengths go in separate batches, so that padding never costs more than about the real positions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from swarm.blocks import compat

logger = logging.getLogger(__name__)


@dataclass
class DecodeStep:
    """One session's decode step, validated, waiting for the compute thread."""

    run_alone: Callable[[], torch.Tensor]  # the step as an unbatched call (truncates, runs, undoes on failure)
    span: torch.nn.Module
    cache: object  # the session's DynamicCache
    first: int
    last: int
    position: int  # where the new token goes: the cache is rewound to this length first
    hidden: torch.Tensor  # (rows, 1, hidden_size) in the span's dtype
    positions: torch.Tensor  # (rows, 1)
    mask: torch.Tensor | None  # (rows, position + 1), or None: no padding
    future: asyncio.Future = field(default=None, repr=False)

    @property
    def key(self) -> tuple:
        """Steps with equal keys can share one call."""
        return id(self.span), self.first, self.last, self.hidden.dtype, self.hidden.device


class DecodeBatcher:
    """Collects decode steps and runs them on ``executor`` (the server's one compute thread), batched where possible.

    ``counters`` (the handler's ``served``) gets ``batched_steps`` (steps that ran inside a batch of two or more)
    and ``decode_batches`` (such batches).
    """

    def __init__(self, executor: Executor, max_rows: int, counters: dict[str, int]):
        self.executor, self.max_rows, self.counters = executor, max(1, max_rows), counters
        counters.setdefault("batched_steps", 0)
        counters.setdefault("decode_batches", 0)
        self.lock = threading.Lock()  # `waiting` is filled by the event loop and drained by the compute thread
        self.waiting: list[DecodeStep] = []
        self.scheduled = False  # a drain is queued on the executor and has not taken its steps yet

    async def run(self, step: DecodeStep) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        step.future = loop.create_future()
        with self.lock:
            self.waiting.append(step)
            schedule, self.scheduled = not self.scheduled, True
        if schedule:
            self.executor.submit(self._drain, loop)
        return await step.future

    # ---- on the compute thread

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            taken, rows = [], 0
            while self.waiting and (not taken or rows + self.waiting[0].hidden.shape[0] <= self.max_rows):
                step = self.waiting.pop(0)
                taken.append(step)
                rows += step.hidden.shape[0]
            self.scheduled = bool(self.waiting)  # the rest goes in the next drain, queued behind other work
        if self.scheduled:
            self.executor.submit(self._drain, loop)
        groups: dict[tuple, list[DecodeStep]] = {}
        for step in taken:
            groups.setdefault(step.key, []).append(step)
        for group in (chunk for steps in groups.values() for chunk in _by_length(steps)):
            if len(group) > 1 and all(compat.is_mergeable(step.cache) for step in group):
                try:
                    outputs = self._run_batch(group)
                except Exception:
                    logger.warning(f"A batch of {len(group)} decode steps failed; running them one by one",
                                   exc_info=True)
                else:
                    loop.call_soon_threadsafe(self._count, len(group))
                    for step, output in zip(group, outputs, strict=True):
                        loop.call_soon_threadsafe(_resolve, step.future, output, None)
                    continue
            for step in group:
                try:
                    result, error = step.run_alone(), None
                except BaseException as e:  # goes to this step's caller only
                    result, error = None, e
                loop.call_soon_threadsafe(_resolve, step.future, result, error)

    @staticmethod
    def _run_batch(group: list[DecodeStep]) -> list[torch.Tensor]:
        span, first, last = group[0].span, group[0].first, group[0].last
        caches = [step.cache for step in group]
        rows = [step.hidden.shape[0] for step in group]
        length = max(step.position for step in group)  # past positions of the merged cache
        try:
            for step in group:
                compat.truncate_cache(step.cache, step.position)  # a client rewinding (or replaying)
                lengths = compat.cache_layer_lengths(step.cache)[first:last]
                if any(n != step.position for n in lengths):  # the padding masks would not match the caches
                    raise ValueError(f"cache layers hold {lengths} positions, the step starts at {step.position}")
            masks = []
            for step in group:
                own = step.mask if step.mask is not None else torch.ones(step.hidden.shape[0], step.position + 1,
                                                                           dtype=torch.long)
                pad = own.new_zeros(own.shape[0], length - step.position)
                masks.append(torch.cat([pad, own.to(torch.long)], dim=1))
            merged = compat.merge_caches(span.config, caches, rows, length, first, last)
            with torch.no_grad():
                output = span(torch.cat([step.hidden for step in group]), torch.cat([step.positions for step in group]),
                              torch.cat(masks), merged, first, last)
            compat.append_from_merged(merged, caches, rows, 1, first, last)
        except BaseException:
            for step in group:  # each session's cache as it was before this step (never longer)
                compat.truncate_cache(step.cache, step.position)
            raise
        return list(output.split(rows))

    def _count(self, steps: int) -> None:
        self.counters["batched_steps"] += steps
        self.counters["decode_batches"] += 1


PAD_SLACK = 32  # positions of padding always tolerated (short sessions batch together whatever their lengths)


def _by_length(steps: list[DecodeStep]) -> list[list[DecodeStep]]:
    """``steps`` in chunks whose lengths are within a factor of 2 of the chunk's longest (plus some slack): the
    merged cache is padded to the longest, and a short session batched with a long one would otherwise copy (and
    attend over) many times the positions it holds."""
    chunks: list[list[DecodeStep]] = []
    for step in sorted(steps, key=lambda step: -step.position):
        if chunks and 2 * (step.position + PAD_SLACK) >= chunks[-1][0].position:
            chunks[-1].append(step)
        else:
            chunks.append([step])
    return chunks


def _resolve(future: asyncio.Future, result: torch.Tensor | None, error: BaseException | None) -> None:
    if future.done():  # its caller went away (the session closed meanwhile)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
