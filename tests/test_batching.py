"""Decode steps of several sessions run as one call of the span (swarm/server/batching.py): the outputs and caches
equal unbatched runs, batching really happens on a server under concurrent sessions, a step can opt out, and a bad
step stays its own caller's problem."""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.blocks.served import Bounds
from swarm.blocks.span import BlockSpan
from swarm.compression import deserialize_tensor, serialize_tensor
from swarm.dht.node import start_dht, stop_dht
from swarm.rpc import protocol
from swarm.rpc.client import RemoteError, Stream, call
from swarm.server.batching import DecodeBatches, DecodeStep, _by_length, run_batch
from swarm.server.compute import ComputeQueue, single
from swarm.utils.loop_thread import LoopThread

HIDDEN = 64  # tiny llama
RTOL = 1e-5  # float32: batched and unbatched differ by rounding only


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def span(model_path):
    return BlockSpan.from_pretrained(str(model_path), 0, 6)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item() / expected.abs().max().item()
    assert error < RTOL, f"relative error {error:.2e}"


# ---- in process: the batched call itself


def prefilled(span: BlockSpan, length: int, rows: int = 1, first: int = 0, last: int = 6, pad: int = 0):
    """A session cache holding ``length`` positions, and the session's attention mask (``pad`` left-padded
    positions on its last row)."""
    cache = span.new_cache()
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[-1, :pad] = 0
    if length:
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            span(torch.randn(rows, length, HIDDEN), positions, mask if pad else None, cache, first, last)
    return cache, (mask if pad else None)


@pytest.mark.parametrize("first,last", [(0, 6), (2, 5)])
def test_batched_call_equals_unbatched(span, first, last):
    """Sessions of different lengths (one empty, one of two left-padded rows) decode together for a few steps:
    each one's output and cache equal what running alone gives."""
    torch.manual_seed(0)
    shapes = [(3, 1, 0), (11, 1, 0), (0, 1, 0), (6, 2, 2)]  # (length, rows, left padding)
    alone = [prefilled(span, length, rows, first, last, pad) for length, rows, pad in shapes]
    batched = [(copy.deepcopy(cache), mask) for cache, mask in alone]
    for step in range(4):
        hiddens = [torch.randn(rows, 1, HIDDEN) for _, rows, _ in shapes]
        steps, expected = [], []
        for (length, rows, _), hidden, (cache, mask), (own_cache, _) in zip(shapes, hiddens, alone, batched,
                                                                                   strict=True):
            position = length + step
            mask = None if mask is None else torch.cat([mask, torch.ones(rows, step + 1, dtype=torch.long)], 1)
            positions = torch.full((rows, 1), position) if mask is None else mask.sum(1, keepdim=True) - 1
            with torch.no_grad():
                expected.append(span(hidden, positions, mask, cache, first, last))
            steps.append(DecodeStep(None, span, own_cache, first, last, position, hidden, positions, mask))
        for output, reference in zip(run_batch(steps), expected, strict=True):
            assert_close(output, reference)
    for (cache, _), (own_cache, _) in zip(alone, batched, strict=True):
        for layer, own_layer in zip(cache.layers, own_cache.layers, strict=True):
            assert layer.get_seq_length() == own_layer.get_seq_length()
            if layer.get_seq_length():
                assert_close(own_layer.keys, layer.keys)
                assert_close(own_layer.values, layer.values)


def test_failed_batch_runs_steps_alone_and_errors_stay_with_their_step(span):
    """A step that cannot be merged (its cache does not hold the positions it claims) fails the batch; every step
    then runs alone: the good ones get their right outputs, the bad one alone gets its error."""
    torch.manual_seed(1)
    counters: dict[str, int] = {}
    caches = [prefilled(span, length)[0] for length in (4, 9, 5)]
    references = [copy.deepcopy(cache) for cache in caches]
    hiddens = [torch.randn(1, 1, HIDDEN) for _ in caches]
    claimed = [4, 9, 7]  # the last one claims two positions its cache does not hold

    def alone(index: int):
        def run():
            yield from ()
            if index == 2:
                raise ValueError("bad step")
            with torch.no_grad():
                return span(hiddens[index], torch.tensor([[claimed[index]]]), None, caches[index])
        return run

    steps = [DecodeStep(alone(i), span, caches[i], 0, 6, claimed[i], hiddens[i], torch.tensor([[claimed[i]]]), None)
             for i in range(3)]
    blocker = threading.Event()  # holds the compute thread so that all three steps wait together

    async def main():
        queue = ComputeQueue(batch_runner=DecodeBatches(counters))
        try:
            hold = asyncio.ensure_future(queue.run("other", single(blocker.wait)))
            await asyncio.sleep(0.05)
            tasks = [asyncio.ensure_future(queue.run(f"peer{i}", step.run_alone, batch_key=step.key, payload=step))
                     for i, step in enumerate(steps)]
            await asyncio.sleep(0.05)
            blocker.set()
            await hold
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            queue.stop()

    results = asyncio.run(main())
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad step"
    for index in (0, 1):
        with torch.no_grad():
            expected = span(hiddens[index], torch.tensor([[claimed[index]]]), None, references[index])
        assert_close(results[index], expected)
    assert counters == {"batched_steps": 0, "decode_batches": 0}


def test_sessions_of_very_different_lengths_are_not_padded_together(span):
    steps = [DecodeStep(None, span, None, 0, 6, position, torch.zeros(1, 1, HIDDEN), torch.zeros(1, 1), None)
             for position in (5, 1000, 400, 600, 10)]
    assert [[step.position for step in chunk] for chunk in _by_length(steps)] == [[1000, 600], [400], [10, 5]]


@pytest.mark.parametrize("rows, tokens, serial", [(1, 1, True), (4, 1, True), (1, 4, True), (8, 1, False),
                                                  (1, 5, False)])
def test_decode_sized_requests_run_on_one_thread(span, rows, tokens, serial):
    """Steps and forwards of up to four positions are bound by reading the weights, not by arithmetic: the compute
    thread runs them alone (swarm/server/compute.py); larger ones get the thread pool."""
    bounds = Bounds()
    session = span.open_session({"start": 0, "end": 6, "max_length": 16, "batch_size": rows}, bounds)
    message = {"start": 0, "end": 6, "position": 0, "hidden": serialize_tensor(torch.randn(rows, tokens, HIDDEN)),
               "position_ids": serialize_tensor(torch.arange(tokens).expand(rows, tokens).contiguous())}
    assert span.prepare("step", message, session, bounds).serial is serial
    assert span.prepare("forward", message, None, bounds).serial is serial


# ---- a real server


@pytest.fixture(scope="module")
def server(launcher, model_path):
    return launcher.start_server_in_process(model_path, "0:6", [], "--peer-rate", "10000", "--peer-burst", "10000")


@pytest.fixture(scope="module")
def client(server):
    loop = LoopThread()
    p2p, node = loop.run(start_dht([server.maddr], host="127.0.0.1", client_mode=True))
    yield loop, p2p
    loop.run(stop_dht(p2p, node))
    loop.stop()


def served(client, server) -> dict:
    loop, p2p = client
    return loop.run(call(p2p, server.peer_id, protocol.INFO, {}, timeout=10))["served"]


class Session:
    """A bare inference session over blocks 0:6, driven message by message; keeps a local twin of its cache."""

    def __init__(self, client, server, span: BlockSpan, prompt: int):
        self.loop, p2p = client
        self.span, self.cache, self.length = span, span.new_cache(), 0
        self.stream = self.loop.run(Stream.open(p2p, server.peer_id, protocol.INFERENCE, timeout=10))
        reply = self.loop.run(self.stream.request({"type": "open", "start": 0, "end": 6, "max_length": 64}, 30))
        self.session_id = reply["session_id"]
        self.prompt = prompt

    def message(self, hidden: torch.Tensor, **extra) -> dict:
        tokens = hidden.shape[1]
        positions = torch.arange(self.length, self.length + tokens)[None]
        return {"type": "step", "session_id": self.session_id, "start": 0, "end": 6, "position": self.length,
                "hidden": serialize_tensor(hidden), "position_ids": serialize_tensor(positions), **extra}

    async def step(self, hidden: torch.Tensor, **extra) -> torch.Tensor:
        """The server's output, checked against the local span run alone on the local cache."""
        reply = await self.stream.request(self.message(hidden, **extra), timeout=30)
        output = deserialize_tensor(reply["hidden"])
        with torch.no_grad():
            expected = self.span(hidden, torch.arange(self.length, self.length + hidden.shape[1])[None], None,
                                 self.cache)
        assert_close(output, expected)
        self.length += hidden.shape[1]
        return output

    def close(self) -> None:
        self.stream.close()


async def together(*coroutines):
    return await asyncio.gather(*coroutines)


def decode_together(sessions: list[Session], steps: int, **extra) -> None:
    """Prefill each session, then send every session's decode step at the same moment, ``steps`` times."""
    loop = sessions[0].loop
    for session in sessions:
        loop.run(session.step(torch.randn(1, session.prompt, HIDDEN)))
    for _ in range(steps):
        loop.run(together(*(session.step(torch.randn(1, 1, HIDDEN), **extra) for session in sessions)))


def test_concurrent_sessions_are_batched_and_equal_unbatched(client, server, span):
    torch.manual_seed(2)
    before = served(client, server)
    sessions = [Session(client, server, span, prompt) for prompt in (2, 5, 9, 13, 17)]
    try:
        decode_together(sessions, steps=8)
    finally:
        for session in sessions:
            session.close()
    after = served(client, server)
    assert after["batched_steps"] > before["batched_steps"], after
    assert after["decode_batches"] > before["decode_batches"]


def test_steps_can_opt_out(client, server, span):
    torch.manual_seed(3)
    before = served(client, server)
    sessions = [Session(client, server, span, prompt) for prompt in (3, 8, 4)]
    try:
        decode_together(sessions, steps=6, batch=False)
    finally:
        for session in sessions:
            session.close()
    after = served(client, server)
    assert after["batched_steps"] == before["batched_steps"]
    assert after["steps"] >= before["steps"] + 3 * 7


def test_bad_step_does_not_disturb_the_other_sessions(client, server, span):
    """While the others decode together, one session sends a refused step each round and then a good one: the
    others' outputs stay right, and so does the offender's own session."""
    torch.manual_seed(4)
    loop = client[0]
    sessions = [Session(client, server, span, prompt) for prompt in (4, 7, 10, 6)]
    offender = sessions[-1]
    try:
        decode_together(sessions, steps=1)

        async def bad_step():
            message = offender.message(torch.randn(1, 1, HIDDEN))
            message["position"] = offender.length + 5  # beyond what its cache holds
            with pytest.raises(RemoteError, match="positions are cached"):
                await offender.stream.request(message, timeout=30)

        for _ in range(4):
            loop.run(together(bad_step(), *(s.step(torch.randn(1, 1, HIDDEN)) for s in sessions[:-1])))
            loop.run(together(*(s.step(torch.randn(1, 1, HIDDEN)) for s in sessions)))
    finally:
        for session in sessions:
            session.close()


@pytest.mark.parametrize("server_batching", [True, False])
def test_concurrent_generation_equals_local_greedy(server, model_path, client, server_batching):
    """Clients generating at the same time through the server get the local model's greedy tokens; clients that
    opt out of server batching (a per-request switch of the acceleration methods) are never batched."""
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    prompts = [torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
               for length in (3, 6, 10, 15)]
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=None)
    expected = [local.generate(ids, attention_mask=torch.ones_like(ids), **kwargs) for ids in prompts]
    models = [AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=[server.maddr],
                                                              compression="none", server_batching=server_batching)
              for _ in prompts]
    before = served(client, server)
    try:
        start = threading.Barrier(len(models))

        def generate(model, ids: torch.Tensor) -> torch.Tensor:
            start.wait()
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

        with ThreadPoolExecutor(len(models)) as pool:
            outputs = list(pool.map(generate, models, prompts))
    finally:
        for model in models:
            model.shutdown()
    for output, reference in zip(outputs, expected, strict=True):
        assert torch.equal(output, reference)
    batched = served(client, server)["batched_steps"] - before["batched_steps"]
    assert batched > 0 if server_batching else batched == 0
