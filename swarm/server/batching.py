"""Decode steps of several inference sessions run as one call of the span.

A decode step (one new token per row) costs about the same whether it carries one row or a dozen: the time goes
into reading the layers' weights, not into the arithmetic. So when several sessions' decode steps are waiting for
the compute thread at once, they run together: their hidden states are stacked along the batch, their KV caches are
copied, left-padded to the longest, into one temporary cache, the padding is masked out, and each session gets back
its own rows of the output and has its own cache grown by its new positions, exactly as if it had run alone.

No step waits for company: a step that finds the compute thread idle runs at once (alone); steps that arrive
while it is busy wait in the compute queue (compute.py), which hands the ones at the head of their peers' queues to
this runner together when it frees up. Only steps that can be merged exactly are:
the same span object, layer range and adapter, one new token, no beam reorder, plain full-attention caches of one
dtype.
Anything else, or a batch that fails, runs step by step as before, each error going to its own caller. Sessions
of very different lengths go in separate batches, so that padding never costs more than about the real positions.
"""

from __future__ import annotations

import logging
from collections.abc import Generator

import torch

from swarm.blocks import compat
from swarm.blocks.span import DecodeStep

logger = logging.getLogger(__name__)


class DecodeBatches:
    """The compute queue's batch runner (compute.py): decode steps that were waiting together, merged where they
    can be, else run one by one, each with its own result or error.

    ``counters`` (the handler's ``served``) gets ``batched_steps`` (steps that ran inside a batch of two or more)
    and ``decode_batches`` (such batches); it is updated on the compute thread (plain integer increments).
    """

    def __init__(self, counters: dict[str, int]):
        self.counters = counters
        counters.setdefault("batched_steps", 0)
        counters.setdefault("decode_batches", 0)

    def __call__(self, jobs: list) -> list[tuple[torch.Tensor | None, BaseException | None]]:
        steps: list[DecodeStep] = [job.payload for job in jobs]
        results: dict[int, tuple[torch.Tensor | None, BaseException | None]] = {}
        for group in _by_length(steps):
            if len(group) > 1 and all(compat.is_mergeable(step.cache) for step in group):
                try:
                    outputs = run_batch(group)
                except Exception:
                    logger.warning(f"A batch of {len(group)} decode steps failed; running them one by one",
                                   exc_info=True)
                else:
                    self.counters["batched_steps"] += len(group)
                    self.counters["decode_batches"] += 1
                    results.update({id(step): (output, None) for step, output in zip(group, outputs, strict=True)})
                    continue
            for step in group:
                try:
                    results[id(step)] = (drain(step.run_alone()), None)
                except BaseException as e:  # goes to this step's caller only
                    results[id(step)] = (None, e)
        return [results[id(step)] for step in steps]


def drain(pieces: Generator):
    """Run a piecewise computation to its end in one go; its return value."""
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value


def run_batch(group: list[DecodeStep]) -> list[torch.Tensor]:
    """The steps of ``group`` as one call of their span: each one's output, its cache grown as if it ran alone."""
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
                          torch.cat(masks), merged, first, last, adapter=group[0].adapter)
        compat.append_from_merged(merged, caches, rows, 1, first, last)
    except BaseException:
        for step in group:  # each session's cache as it was before this step (never longer)
            compat.truncate_cache(step.cache, step.position)
        raise
    return list(output.split(rows))


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
