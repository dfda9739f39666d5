"""Codecs for tensors that cross the network: one small class per codec, chosen by name per request.

Every codec turns a tensor into named msgpack-friendly fields and back (serialize.py packs them in order).
Decoding validates what it reads: a payload whose size does not match its declared shape and dtype is rejected
with a clear error, never reshaped blindly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from swarm.compression import blockwise

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class PayloadError(ValueError):
    """A serialized tensor that cannot be decoded (truncated, corrupted, inconsistent or hostile)."""


class Codec(ABC):
    name: str
    fields: tuple[str, ...] = ("data",)  # what ``encode`` returns, in wire order (serialize.py)

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> dict:
        """Codec-specific fields of the serialized tensor."""

    @abstractmethod
    def decode(self, fields: dict, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Rebuild a tensor of ``dtype`` and ``shape`` from the fields ``encode`` produced."""


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _from_raw(data: object, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(data, bytes):
        raise PayloadError("tensor data must be bytes")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise PayloadError(f"tensor data has {len(data)} bytes, but shape {list(shape)} of {dtype} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


class NoCodec(Codec):
    """Raw bytes in the tensor's own dtype: bit-exact."""

    name = "none"

    def encode(self, tensor: torch.Tensor) -> dict:
        return {"data": _raw_bytes(tensor)}

    def decode(self, fields: dict, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return _from_raw(fields.get("data"), dtype, shape)


class CastCodec(Codec):
    """Floating tensors sent in a 16-bit float type and cast back on arrival; other tensors go raw."""

    def __init__(self, name: str, wire_dtype: torch.dtype):
        self.name, self.wire_dtype = name, wire_dtype

    def encode(self, tensor: torch.Tensor) -> dict:
        if tensor.is_floating_point():
            return {"data": _raw_bytes(tensor.to(self.wire_dtype))}
        return {"data": _raw_bytes(tensor)}

    def decode(self, fields: dict, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if dtype.is_floating_point:
            return _from_raw(fields.get("data"), self.wire_dtype, shape).to(dtype)
        return _from_raw(fields.get("data"), dtype, shape)


class Blockwise8BitCodec(Codec):
    """Floating tensors as dynamic 8-bit codes plus one absmax scale per block (blockwise.py); others raw.

    Scales travel as float16 when they fit (their 5e-4 rounding is far below the code's ~1e-2), else float32; the
    decoder tells them apart by length, which must be exactly 2 or 4 bytes per block.
    """

    name = "blockwise8"
    fields = ("data", "absmax", "block")
    _FLOAT16_MAX = float(torch.finfo(torch.float16).max)

    def __init__(self, block: int = 64):
        self.block = block

    def encode(self, tensor: torch.Tensor) -> dict:
        if not tensor.is_floating_point():
            return {"data": _raw_bytes(tensor), "absmax": None, "block": None}
        if not torch.isfinite(tensor).all():
            raise PayloadError("cannot quantize a tensor with NaN or infinite values")
        codes, absmax = blockwise.quantize(tensor, self.block)
        if absmax.numel() and absmax.max() <= self._FLOAT16_MAX:
            absmax = absmax.half()  # rescales each block by at most 1 + 5e-4
        return {"data": _raw_bytes(codes), "absmax": _raw_bytes(absmax), "block": self.block}

    def decode(self, fields: dict, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if not dtype.is_floating_point:
            return _from_raw(fields.get("data"), dtype, shape)
        block = fields.get("block")
        if block not in blockwise.BLOCK_SIZES or isinstance(block, bool):
            raise PayloadError(f"invalid block size {block!r}; expected one of {blockwise.BLOCK_SIZES}")
        numel = math.prod(shape)
        codes = _from_raw(fields.get("data"), torch.uint8, (numel,))
        blocks, scales = blockwise.num_blocks(numel, block), fields.get("absmax")
        scale_dtype = {2 * blocks: torch.float16, 4 * blocks: torch.float32}.get(
            len(scales) if isinstance(scales, bytes) else -1)
        if scale_dtype is None:
            raise PayloadError(f"wrong block count: {numel} values in blocks of {block} need {blocks} scales "
                               f"({2 * blocks} or {4 * blocks} bytes)")
        absmax = _from_raw(scales, scale_dtype, (blocks,)).float()
        if not (torch.isfinite(absmax).all() and (absmax >= 0).all()):
            raise PayloadError("block scales must be finite and non-negative")
        return blockwise.dequantize(codes, absmax, block, dtype).reshape(shape)


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (NoCodec(), CastCodec("float16", torch.float16), CastCodec("bfloat16", torch.bfloat16),
                  Blockwise8BitCodec())
}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise PayloadError(f"unknown codec {name!r}; known: {sorted(CODECS)}") from None
