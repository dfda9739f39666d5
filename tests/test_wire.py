"""Tensor codecs and message framing, on hostile inputs too."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch

from swarm.compression import PayloadError, deserialize_tensor, serialize_tensor
from swarm.compression.serialize import pack_fields, tensor_fields
from swarm.rpc.framing import MalformedMessage, MessageTooLarge, encode_message, read_message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_raw_codec_is_exact(dtype):
    tensor = (torch.randn(2, 3, 5) * 10).to(dtype)
    assert torch.equal(deserialize_tensor(serialize_tensor(tensor)), tensor)


@pytest.mark.parametrize("codec, tolerance", [("float16", 1e-3), ("bfloat16", 1e-2)])
def test_16bit_codecs_halve_the_bytes(codec, tolerance):
    tensor = torch.randn(4, 64)
    encoded = serialize_tensor(tensor, codec)
    assert len(tensor_fields(encoded)["data"]) == tensor.numel() * 2
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
@pytest.mark.parametrize("form", ["array", "map"])  # the compact wire form, and the map of earlier versions
def test_malformed_tensors_are_refused(mutate, error, form):
    message = tensor_fields(serialize_tensor(torch.randn(2, 3, 5)))
    mutate(message)
    with pytest.raises(PayloadError, match=error):
        deserialize_tensor(pack_fields(message) if form == "array" else message, max_numel=10**6)


@pytest.mark.parametrize("codec", ["none", "float16", "blockwise8"])
def test_compact_form_and_map_form_decode_alike(codec):
    tensor = torch.randn(3, 70)
    compact = serialize_tensor(tensor, codec)
    assert isinstance(compact, list) and isinstance(compact[0], int) and isinstance(compact[2], int)
    assert torch.equal(deserialize_tensor(compact), deserialize_tensor(tensor_fields(compact)))
    named = {**tensor_fields(compact), "dtype": "float32", "codec": codec}  # names instead of codes are accepted
    assert torch.equal(deserialize_tensor(pack_fields(named)), deserialize_tensor(compact))
    # a whole 1-token hidden state of a 576-wide model: the array form costs ~8 bytes beyond the data
    step = serialize_tensor(torch.randn(1, 1, 576), codec)
    data = sum(len(v) for v in tensor_fields(step).values() if isinstance(v, bytes))
    assert len(msgpack.packb(step)) <= data + 16


@pytest.mark.parametrize("bad, error", [
    ([], "must be an array"), ([0, [1]], "must be an array"), ("tensor", "must be an array"), (None, "got NoneType"),
    ([0, [2], 0], "has 4 entries"), ([0, [2], 0, b"\0" * 8, b"extra"], "has 4 entries"),
    ([0, [2], 3, b"\0\0"], "has 6 entries"), ([0, [2], 99, b"\0" * 8], "unknown codec 99"),
    ([99, [2], 0, b"\0" * 8], "unknown tensor dtype 99"), ([True, [2], 0, b"\0" * 8], "unknown tensor dtype True"),
    ([0, [2], [0], b"\0" * 8], "unknown codec"), ([-1, [2], 0, b"\0" * 8], "unknown tensor dtype -1"),
])
def test_malformed_arrays_are_refused(bad, error):
    with pytest.raises(PayloadError, match=error):
        deserialize_tensor(bad)


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
