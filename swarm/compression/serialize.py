"""Tensor <-> message dict, through a named codec."""

from __future__ import annotations

import math

import torch

from swarm.compression.codecs import DTYPE_NAMES, DTYPES, PayloadError, get_codec


def serialize_tensor(tensor: torch.Tensor, codec: str = "none") -> dict:
    if tensor.dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot send tensors of dtype {tensor.dtype}")
    return {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "codec": codec,
            **get_codec(codec).encode(tensor)}


def deserialize_tensor(obj: object, max_numel: int | None = None) -> torch.Tensor:
    """Decode a serialized tensor, refusing anything malformed or larger than ``max_numel`` elements."""
    if not isinstance(obj, dict):
        raise PayloadError(f"a tensor must be a map, got {type(obj).__name__}")
    dtype = DTYPES.get(obj.get("dtype")) if isinstance(obj.get("dtype"), str) else None
    if dtype is None:
        raise PayloadError(f"unknown tensor dtype {obj.get('dtype')!r}; known: {sorted(DTYPES)}")
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape) or len(shape) > 8:
        raise PayloadError(f"invalid tensor shape {shape!r}")
    numel = math.prod(shape)
    if max_numel is not None and numel > max_numel:
        raise PayloadError(f"tensor of shape {shape} has {numel} elements, over the limit of {max_numel}")
    return get_codec(obj.get("codec")).decode(obj, dtype, tuple(shape))
