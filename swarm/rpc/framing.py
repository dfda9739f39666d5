"""Length-prefixed msgpack messages over a libp2p stream, with a size limit checked before reading.

hivemind's protobuf stream helpers read whatever length a peer announces; a server facing the open swarm must
refuse an oversized message from its header alone, so we frame messages ourselves.
"""

from __future__ import annotations

import asyncio

import msgpack

HEADER_BYTES = 8
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024**2
# Bytes this process wrote and read in messages (acceleration history records what a request cost on the wire).
TRAFFIC = {"sent": 0, "received": 0}


class MessageTooLarge(ValueError):
    pass


class MalformedMessage(ValueError):
    pass


def encode_message(message: dict) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return len(payload).to_bytes(HEADER_BYTES, "big") + payload


async def write_message(writer: asyncio.StreamWriter, message: dict) -> None:
    data = encode_message(message)
    TRAFFIC["sent"] += len(data)
    writer.write(data)
    await writer.drain()


async def read_message(reader: asyncio.StreamReader, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict | None:
    """The next message, or None if the peer closed the stream cleanly between messages."""
    try:
        header = await reader.readexactly(HEADER_BYTES)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise MalformedMessage("stream ended inside a message header") from e
    length = int.from_bytes(header, "big")
    if length > max_bytes:
        raise MessageTooLarge(f"message of {length} bytes exceeds the limit of {max_bytes} bytes")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise MalformedMessage(f"stream ended after {len(e.partial)} of {length} message bytes") from e
    TRAFFIC["received"] += HEADER_BYTES + length
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:
        raise MalformedMessage(f"message is not valid msgpack: {e}") from e
    if not isinstance(message, dict):
        raise MalformedMessage(f"message must be a map, got {type(message).__name__}")
    return message
