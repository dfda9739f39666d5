"""Tensor codecs and message framing, on hostile inputs too."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch

from swarm.compression import PayloadError, deserialize_tensor, serialize_tensor
from swarm.rpc.framing import MalformedMessage, MessageTooLarge, encode_message, read_message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_raw_codec_is_exact(dtype):
    tensor = (torch.randn(2, 3, 5) * 10).to(dtype)
    assert torch.equal(deserialize_tensor(serialize_tensor(tensor)), tensor)


@pytest.mark.parametrize("codec, tolerance", [("float16", 1e-3), ("bfloat16", 1e-2)])
def test_16bit_codecs_halve_the_bytes(codec, tolerance):
    tensor = torch.randn(4, 64)
    encoded = serialize_tensor(tensor, codec)
    assert len(encoded["data"]) == tensor.numel() * 2
    decoded = deserialize_tensor(encoded)
    assert decoded.dtype == torch.float32
    assert torch.allclose(decoded, tensor, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("mutate, error", [
    (lambda m: m.update(data=m["data"][:-3]), "bytes, but shape"),
    (lambda m: m.update(shape=[2, 3, 6]), "bytes, but shape"),
    (lambda m: m.update(shape=[2, -3, 5]), "invalid tensor shape"),
    (lambda m: m.update(shape="2x3"), "invalid tensor shape"),
    (lambda m: m.update(dtype="complex1024"), "unknown tensor dtype"),
    (lambda m: m.update(codec="gzip"), "unknown codec"),
    (lambda m: m.update(data="text"), "must be bytes"),
    (lambda m: m.update(shape=[10**6, 10**6]), "over the limit"),
])
def test_malformed_tensors_are_refused(mutate, error):
    message = serialize_tensor(torch.randn(2, 3, 5))
    mutate(message)
    with pytest.raises(PayloadError, match=error):
        deserialize_tensor(message, max_numel=10**6)


def _read(data: bytes, max_bytes: int = 1024):
    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_message(reader, max_bytes)

    return asyncio.run(run())


def test_framing_round_trip_and_clean_eof():
    assert _read(encode_message({"a": 1, "b": b"\x00"})) == {"a": 1, "b": b"\x00"}
    assert _read(b"") is None


def test_framing_refuses_oversized_from_the_header_alone():
    with pytest.raises(MessageTooLarge, match="exceeds the limit of 1024 bytes"):
        _read((10**12).to_bytes(8, "big"))  # no payload follows: it is never waited for


@pytest.mark.parametrize("data, error", [
    (b"\x00\x00\x00", "inside a message header"),
    ((100).to_bytes(8, "big") + b"short", "stream ended after 5 of 100"),
    (len(b"\xc1").to_bytes(8, "big") + b"\xc1", "not valid msgpack"),
    (len(msgpack.packb("str")).to_bytes(8, "big") + msgpack.packb("str"), "must be a map"),
])
def test_framing_refuses_malformed(data, error):
    with pytest.raises(MalformedMessage, match=error):
        _read(data)
