"""A server refuses every malformed, oversized or hostile request with a clear error, for that caller only."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import torch

from swarm.blocks.span import BlockSpan
from swarm.compression import serialize_tensor
from swarm.compression.serialize import pack_fields, tensor_fields
from swarm.dht.node import start_dht, stop_dht
from swarm.rpc import protocol
from swarm.rpc.client import RemoteError, Stream, call
from swarm.rpc.framing import HEADER_BYTES
from swarm.utils.loop_thread import LoopThread

HIDDEN = 64  # tiny llama


@pytest.fixture(scope="module")
def server(launcher, tiny_model):
    path = tiny_model("llama")
    # one peer may hold the whole (small) cache here: per-peer shares are test_limits' concern
    process = launcher.start_server_in_process(path, "0:3", [], "--max-message-mb", "1", "--cache-tokens", "256",
                                               "--max-session-length", "128", "--session-timeout", "3",
                                               "--max-peer-cache-share", "1", "--new-peer-cache-share", "1")
    return {"process": process, "span": BlockSpan.from_pretrained(str(path), 0, 3)}


@pytest.fixture(scope="module")
def rpc(server):
    """A bare libp2p client, to send requests our own client would never build."""
    loop = LoopThread()
    p2p, node = loop.run(start_dht([server["process"].maddr], host="127.0.0.1", client_mode=True))
    yield loop, p2p
    loop.run(stop_dht(p2p, node))
    loop.stop()


def forward_request(hidden: torch.Tensor, start: int = 0, end: int = 3, /, **overrides) -> dict:
    batch, tokens = hidden.shape[:2]
    message = {"start": start, "end": end, "hidden": serialize_tensor(hidden),
               "position_ids": serialize_tensor(torch.arange(tokens).expand(batch, tokens).contiguous())}
    message.update(overrides)
    return message


def call_forward(rpc, server, message: dict) -> dict:
    loop, p2p = rpc
    return loop.run(call(p2p, server["process"].peer_id, protocol.FORWARD, message, timeout=30))


def assert_still_serves(rpc, server) -> None:
    hidden = torch.randn(2, 5, HIDDEN)
    reply = call_forward(rpc, server, forward_request(hidden))
    from swarm.compression import deserialize_tensor

    expected = server["span"](hidden, torch.arange(5).expand(2, 5))
    assert torch.allclose(deserialize_tensor(reply["hidden"]), expected, atol=1e-5)


BAD_FORWARDS = {
    "wrong hidden size": (forward_request(torch.randn(1, 4, HIDDEN + 1)), "hidden size 65"),
    "wrong dtype": (forward_request(torch.ones(1, 4, HIDDEN, dtype=torch.int64)), "floating-point"),
    "wrong rank": (forward_request(torch.randn(4, HIDDEN)), "rank 3"),
    "NaN": (forward_request(torch.full((1, 4, HIDDEN), float("nan"))), "NaN or infinite"),
    "inf": (forward_request(torch.full((1, 4, HIDDEN), float("inf"))), "NaN or infinite"),
    "blocks not held": (forward_request(torch.randn(1, 4, HIDDEN), 2, 5), "not served here"),
    "truncated tensor": (forward_request(torch.randn(1, 4, HIDDEN), hidden=pack_fields({
        **tensor_fields(serialize_tensor(torch.randn(1, 4, HIDDEN))), "data": b"\0" * 100})), "bytes, but shape"),
    "unknown codec": (forward_request(torch.randn(1, 4, HIDDEN), hidden=pack_fields({
        **tensor_fields(serialize_tensor(torch.randn(1, 4, HIDDEN))), "codec": "zip"})), "unknown codec"),
    "missing field": ({"start": 0, "end": 3}, "missing tensor 'hidden'"),
    "wrong field type": (forward_request(torch.randn(1, 4, HIDDEN), start="0"), "field 'start' must be int"),
    "positions out of range": (forward_request(torch.randn(1, 4, HIDDEN), position_ids=serialize_tensor(
        torch.tensor([[0, 1, 2, 10**9]]))), "position_ids must lie in"),
    "oversized": (forward_request(torch.randn(1, 5000, HIDDEN)), "exceeds the limit"),
    "truncated 8-bit codes": (forward_request(torch.randn(1, 4, HIDDEN), hidden=pack_fields({
        **tensor_fields(serialize_tensor(torch.randn(1, 4, HIDDEN), "blockwise8")), "data": b"\1" * 10})),
        "bytes, but shape"),
    "wrong 8-bit block count": (forward_request(torch.randn(1, 4, HIDDEN), hidden=pack_fields({
        **tensor_fields(serialize_tensor(torch.randn(1, 4, HIDDEN), "blockwise8")), "absmax": b"\0" * 12})),
        "wrong block count"),
    "tensor array too short": (forward_request(torch.randn(1, 4, HIDDEN), hidden=[0, [1, 4, HIDDEN], 0]),
                               "has 4 entries"),
    "tensor neither array nor map": (forward_request(torch.randn(1, 4, HIDDEN), hidden="1, 4, 576"),
                                     "must be an array"),
    "deep prompts for other blocks": (forward_request(torch.randn(1, 4, HIDDEN), prompts=serialize_tensor(
        torch.randn(2, 1, 2, HIDDEN))), r"prompts must have shape \[3, 1 or 1, <= 4, 64\]"),
    "deep prompts longer than the input": (forward_request(torch.randn(1, 4, HIDDEN), prompts=serialize_tensor(
        torch.randn(3, 1, 5, HIDDEN))), "prompts.*over the limit"),
    "deep prompts with NaN": (forward_request(torch.randn(1, 4, HIDDEN), prompts=serialize_tensor(
        torch.full((3, 1, 2, HIDDEN), float("nan")))), "prompts contains NaN"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARDS))
def test_bad_forward_is_refused_and_server_keeps_serving(rpc, server, case):
    message, expected_error = BAD_FORWARDS[case]
    with pytest.raises(RemoteError, match=expected_error):
        call_forward(rpc, server, message)
    assert_still_serves(rpc, server)


def _raw_exchange(rpc, server, payload: bytes) -> dict:
    loop, p2p = rpc

    async def exchange() -> dict:
        stream = await Stream.open(p2p, server["process"].peer_id, protocol.FORWARD, timeout=10)
        try:
            stream.writer.write(payload)
            await stream.writer.drain()
            return await stream.receive(timeout=10)
        finally:
            stream.close()

    return loop.run(exchange())


@pytest.mark.parametrize("payload, expected_error", [
    ((10 * 1024**3).to_bytes(HEADER_BYTES, "big"), "exceeds the limit"),  # a 10 GiB header, nothing else sent
    (len(b"\xc1garbage").to_bytes(HEADER_BYTES, "big") + b"\xc1garbage", "not valid msgpack"),
    (len(msgpack.packb([1, 2])).to_bytes(HEADER_BYTES, "big") + msgpack.packb([1, 2]), "must be a map"),
])
def test_malformed_frames_are_refused(rpc, server, payload, expected_error):
    with pytest.raises(RemoteError, match=expected_error):
        _raw_exchange(rpc, server, payload)
    assert_still_serves(rpc, server)


class RawSession:
    """An inference session driven message by message."""

    def __init__(self, rpc, server, max_length: int = 32, batch_size: int = 1):
        self.loop, p2p = rpc
        self.stream = self.loop.run(Stream.open(p2p, server["process"].peer_id, protocol.INFERENCE, timeout=10))
        reply = self.request({"type": "open", "start": 0, "end": 3, "max_length": max_length,
                              "batch_size": batch_size})
        self.session_id = reply["session_id"]

    def request(self, message: dict) -> dict:
        return self.loop.run(self.stream.request(message, timeout=30))

    def step(self, hidden: torch.Tensor, position: int, /, **overrides) -> dict:
        batch, tokens = hidden.shape[:2]
        message = forward_request(hidden, type="step", session_id=self.session_id, position=position,
                                  position_ids=serialize_tensor(torch.arange(position, position + tokens)
                                                                .expand(batch, tokens).contiguous()))
        message.update(overrides)
        return self.request(message)

    def close(self) -> None:
        self.stream.close()


def test_bad_steps_leave_other_sessions_untouched(rpc, server):
    from swarm.compression import deserialize_tensor

    torch.manual_seed(0)
    sequence = torch.randn(1, 9, HIDDEN)
    expected = server["span"](sequence, torch.arange(9)[None])

    victim = RawSession(rpc, server)  # a well-behaved session, half-way through its sequence
    victim.step(sequence[:, :5], 0)
    attacker = RawSession(rpc, server)
    attacker.step(torch.randn(1, 3, HIDDEN), 0)
    bad_steps = {
        "length beyond max_length": (torch.randn(1, 40, HIDDEN), {}, "max_length 32"),
        "unknown session": (torch.randn(1, 1, HIDDEN), dict(session_id="not-a-session"), "unknown session"),
        "position ahead of cache": (torch.randn(1, 1, HIDDEN), dict(position=10), "positions are cached"),
        "NaN": (torch.full((1, 1, HIDDEN), float("nan")), {}, "NaN or infinite"),
        "wrong batch": (torch.randn(2, 1, HIDDEN), {}, "batch of 2"),
        "other blocks": (torch.randn(1, 1, HIDDEN), dict(start=1), "runs blocks 0:3"),
    }
    for hidden, overrides, expected_error in bad_steps.values():
        with pytest.raises(RemoteError, match=expected_error):
            attacker.step(hidden, 3, **overrides)
    attacker.step(torch.randn(1, 1, HIDDEN), 3)  # the attacker's own session survives its refused steps too
    attacker.close()

    reply = victim.step(sequence[:, 5:], 5)
    assert reply["position"] == 9
    assert torch.allclose(deserialize_tensor(reply["hidden"]), expected[:, 5:], atol=1e-5)
    victim.close()


def test_step_on_a_new_stream_is_an_unknown_session(rpc, server):
    loop, p2p = rpc
    with pytest.raises(RemoteError, match="unknown session 'forged'"):
        loop.run(call(p2p, server["process"].peer_id, protocol.INFERENCE,
                      {"type": "step", "session_id": "forged"}, timeout=10))
    assert_still_serves(rpc, server)


def _cache_tokens_left(rpc, server) -> int:
    loop, p2p = rpc
    return loop.run(call(p2p, server["process"].peer_id, protocol.INFO, {}, timeout=10))["cache_tokens_left"]


def test_session_over_cache_budget_is_refused_at_open(rpc, server):
    with pytest.raises(RemoteError, match="not enough cache"):
        RawSession(rpc, server, max_length=128, batch_size=4)  # 512 tokens > the 256 budget
    assert_still_serves(rpc, server)


def test_idle_session_is_closed_and_its_cache_freed(rpc, server):
    before = _cache_tokens_left(rpc, server)
    session = RawSession(rpc, server, max_length=64)
    session.step(torch.randn(1, 4, HIDDEN), 0)
    assert _cache_tokens_left(rpc, server) == before - 64
    time.sleep(4)  # the server's --session-timeout is 3 s
    with pytest.raises(RemoteError, match="idle"):
        session.loop.run(session.stream.receive(timeout=5))
    session.close()
    assert _cache_tokens_left(rpc, server) == before


def test_closed_stream_frees_the_cache(rpc, server):
    before = _cache_tokens_left(rpc, server)
    session = RawSession(rpc, server, max_length=100)
    assert _cache_tokens_left(rpc, server) == before - 100
    session.close()
    deadline = time.monotonic() + 10
    while _cache_tokens_left(rpc, server) != before and time.monotonic() < deadline:
        asyncio.run(asyncio.sleep(0.1))
    assert _cache_tokens_left(rpc, server) == before
