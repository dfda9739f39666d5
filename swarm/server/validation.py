"""Checks on every tensor and field a caller sends, before anything touches the blocks or a cache."""

from __future__ import annotations

import torch

from swarm.compression import PayloadError, deserialize_tensor
from swarm.rpc.protocol import RequestError, get_field


def read_tensor(message: dict, name: str, max_numel: int, required: bool = True) -> torch.Tensor | None:
    if message.get(name) is None:
        if required:
            raise RequestError(f"missing tensor {name!r}")
        return None
    try:
        return deserialize_tensor(message[name], max_numel=max_numel)
    except PayloadError as e:
        raise RequestError(f"bad tensor {name!r}: {e}") from None


def read_block_range(message: dict, served_start: int, served_end: int) -> tuple[int, int]:
    start, end = get_field(message, "start", int), get_field(message, "end", int)
    if not (served_start <= start < end <= served_end):
        raise RequestError(f"blocks {start}:{end} are not served here (this server holds {served_start}:{served_end})")
    return start, end


def read_hidden(message: dict, hidden_size: int, max_tokens: int, name: str = "hidden") -> torch.Tensor:
    hidden = read_tensor(message, name, max_numel=max_tokens * hidden_size)
    if hidden.dim() != 3:
        raise RequestError(f"{name} must have rank 3 (batch, tokens, hidden), got shape {list(hidden.shape)}")
    if hidden.shape[-1] != hidden_size:
        raise RequestError(f"{name} has hidden size {hidden.shape[-1]}, this model's is {hidden_size}")
    if not hidden.is_floating_point():
        raise RequestError(f"{name} must be a floating-point tensor, got {hidden.dtype}")
    if hidden.shape[0] == 0 or hidden.shape[1] == 0:
        raise RequestError(f"{name} is empty (shape {list(hidden.shape)})")
    if not torch.isfinite(hidden).all():
        raise RequestError(f"{name} contains NaN or infinite values")
    return hidden


def read_position_ids(message: dict, batch: int, tokens: int, max_position: int) -> torch.Tensor:
    positions = read_tensor(message, "position_ids", max_numel=batch * tokens)
    if positions.dtype not in (torch.int64, torch.int32) or list(positions.shape) != [batch, tokens]:
        raise RequestError(f"position_ids must be an integer tensor of shape [{batch}, {tokens}], "
                           f"got {positions.dtype} {list(positions.shape)}")
    if positions.numel() and (positions.min() < 0 or positions.max() >= max_position):
        raise RequestError(f"position_ids must lie in [0, {max_position})")
    return positions.long()


def read_attention_mask(message: dict, batch: int, length: int) -> torch.Tensor | None:
    mask = read_tensor(message, "attention_mask", max_numel=batch * length, required=False)
    if mask is None:
        return None
    if list(mask.shape) != [batch, length] or mask.is_floating_point():
        raise RequestError(f"attention_mask must be an integer or bool tensor of shape [{batch}, {length}], "
                           f"got {mask.dtype} {list(mask.shape)}")
    if ((mask != 0) & (mask != 1)).any():
        raise RequestError("attention_mask must hold only 0 and 1")
    return mask.long()
