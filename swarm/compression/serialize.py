"""Tensor <-> message value, through a named codec.

On the wire a tensor is a compact msgpack array ``[dtype, shape, codec, *fields]``: dtype and codec as small
integer codes (``WIRE_DTYPES``, ``WIRE_CODECS``; append-only tables) and the codec's fields in its declared order.
Field names and type names cost about 45 bytes per tensor as a map, which is 8% of an 8-bit decode step of a
576-wide model. Readers also accept the older map form ``{"dtype": "float32", "shape": [...], "codec": "none",
"data": ...}``, so peers of the earlier version interoperate.
"""

from __future__ import annotations

import math

import torch

from swarm.compression.codecs import CODECS, DTYPE_NAMES, DTYPES, PayloadError, get_codec

# Append-only: a code, once given, keeps its meaning.
WIRE_DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
WIRE_CODECS = ["none", "float16", "bfloat16", "blockwise8"]
assert sorted(WIRE_DTYPES) == sorted(DTYPES) and sorted(WIRE_CODECS) == sorted(CODECS)
_DTYPE_CODES = {name: code for code, name in enumerate(WIRE_DTYPES)}
_CODEC_CODES = {name: code for code, name in enumerate(WIRE_CODECS)}


def serialize_tensor(tensor: torch.Tensor, codec: str = "none") -> list:
    if tensor.dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot send tensors of dtype {tensor.dtype}")
    return pack_fields({"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "codec": codec,
                        **get_codec(codec).encode(tensor)})


def pack_fields(fields: dict) -> list:
    """The compact wire form of a tensor given by its named fields (as ``tensor_fields`` returns them). Unknown
    dtypes and codecs are kept as given (the reader refuses them), with a codec's fields in the map's order."""
    try:
        codec = get_codec(fields.get("codec"))
        code, names = _CODEC_CODES[codec.name], codec.fields
    except PayloadError:
        code, names = fields.get("codec"), [key for key in fields if key not in ("dtype", "shape", "codec")]
    dtype = fields.get("dtype")
    return [_DTYPE_CODES.get(dtype, dtype) if isinstance(dtype, str) else dtype, fields.get("shape"), code,
            *(fields.get(name) for name in names)]


def tensor_fields(obj: object) -> dict:
    """The named fields of a serialized tensor (compact array or older map), checked only for their layout."""
    if isinstance(obj, dict):
        return obj
    if not isinstance(obj, list) or len(obj) < 3:
        raise PayloadError(f"a tensor must be an array [dtype, shape, codec, ...] or a map, got {_kind(obj)}")
    dtype, shape, codec = obj[:3]
    dtype = WIRE_DTYPES[dtype] if _is_code(dtype, WIRE_DTYPES) else dtype
    codec = WIRE_CODECS[codec] if _is_code(codec, WIRE_CODECS) else codec
    names = get_codec(codec).fields
    if len(obj) != 3 + len(names):
        raise PayloadError(f"a {codec} tensor has {3 + len(names)} entries ({', '.join(names)} after dtype, shape "
                           f"and codec), got {len(obj)}")
    return {"dtype": dtype, "shape": shape, "codec": codec, **dict(zip(names, obj[3:], strict=True))}


def is_serialized_tensor(obj: object) -> bool:
    """Whether ``obj`` has the outer form of a serialized tensor (its contents are checked when decoding)."""
    return isinstance(obj, (list, dict))


def deserialize_tensor(obj: object, max_numel: int | None = None) -> torch.Tensor:
    """Decode a serialized tensor, refusing anything malformed or larger than ``max_numel`` elements."""
    fields = tensor_fields(obj)
    dtype = DTYPES.get(fields.get("dtype")) if isinstance(fields.get("dtype"), str) else None
    if dtype is None:
        raise PayloadError(f"unknown tensor dtype {fields.get('dtype')!r}; known: {sorted(DTYPES)}")
    shape = fields.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape) or len(shape) > 8:
        raise PayloadError(f"invalid tensor shape {shape!r}")
    numel = math.prod(shape)
    if max_numel is not None and numel > max_numel:
        raise PayloadError(f"tensor of shape {shape} has {numel} elements, over the limit of {max_numel}")
    return get_codec(fields.get("codec")).decode(fields, dtype, tuple(shape))


def _is_code(value: object, table: list[str]) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(table)


def _kind(obj: object) -> str:
    return f"an array of {len(obj)}" if isinstance(obj, list) else type(obj).__name__
