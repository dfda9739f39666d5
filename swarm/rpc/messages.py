"""Every message of the swarm's RPCs, built by the client and read by the server: one place for both sides.

Streams (framing.py) carry msgpack maps. Sessions (``INFERENCE`` for transformer spans, ``DIFFUSION`` for U-Net
levels) start with an ``open`` and carry ``step`` (spans) or ``down``/``up`` (levels), ``link`` and ``close``;
``PUSH`` hands a step from one server to the next; ``FORWARD``/``BACKWARD`` are one request, one reply. Builders
(``open_span``, ``step``, ...) make what a client sends; readers (``read_*``) check what a server receives, field by
field, before anything is computed: a bad field is a ``RequestError`` naming it, for that caller only. What depends
on the model (hidden size, channels, geometry) is checked by the blocks themselves (swarm/blocks/served.py).
"""

from __future__ import annotations

import torch

from swarm.compression import PayloadError, deserialize_tensor, serialize_tensor
from swarm.rpc.protocol import RequestError, get_field

# ---- builders (the client's side)


def span_inputs(start: int, end: int, hidden: list | dict, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, output_codec: str, **extra: object) -> dict:
    """The inputs of a span request (forward, backward, step): ``hidden`` is an already encoded tensor."""
    message = {"start": start, "end": end, "hidden": hidden, "output_codec": output_codec,
               "position_ids": serialize_tensor(position_ids.long()), **extra}
    if attention_mask is not None:
        message["attention_mask"] = serialize_tensor(attention_mask.to(torch.int8))
    return message


def open_span(start: int, end: int, max_length: int, batch_size: int, output_codec: str,
              upstream: str | None, adapter: str | None = None) -> dict:
    """Open an inference session on a span: reserves ``batch_size x max_length`` positions of KV cache; its steps
    run with LoRA ``adapter`` (None: the base model)."""
    return {"type": "open", "start": start, "end": end, "max_length": max_length, "batch_size": batch_size,
            "output_codec": output_codec, "upstream": upstream, **adapter_field(adapter)}


def prompts_field(prompts: torch.Tensor | None) -> dict:
    """The field carrying a request's deep prompts (sent exactly: they are small), if any."""
    return {} if prompts is None else {"prompts": serialize_tensor(prompts.detach().contiguous())}


def adapter_field(adapter: str | None) -> dict:
    """The field naming a request's LoRA adapter (none for the base model, which old servers understand)."""
    return {} if adapter is None else {"active_adapter": adapter}


def conditioning(encoder_hidden_states: torch.Tensor | None, extra: dict, codec: str) -> dict:
    """A generation's conditioning as sent to U-Net levels: at the session's opening, or with a down pass that
    replaces it (a session keeping features across another prompt or image)."""
    fields = {"extra": {key: serialize_tensor(value) if isinstance(value, torch.Tensor) else value
                        for key, value in extra.items()}}
    if encoder_hidden_states is not None:
        fields["encoder_hidden_states"] = serialize_tensor(encoder_hidden_states, codec)
    return fields


def open_levels(start: int, end: int, output_codec: str, encoder_hidden_states: torch.Tensor | None, extra: dict,
                forward_upsample_size: bool, latent_shift_frames: int | None, sample_shape: list[int] | None,
                carry_skips: bool = False, freeu: dict | None = None, processors: dict | None = None,
                feature_bytes: int = 0, adapters: tuple[tuple[str, float], ...] = ()) -> dict:
    """Open a generation on U-Net levels: what stays fixed for all its evaluations, and the shape of its samples
    (batch, channels, height, width), from which the server reserves memory for the skips it keeps."""
    message = {"type": "open", "start": start, "end": end, "output_codec": output_codec,
               **conditioning(encoder_hidden_states, extra, output_codec),
               "forward_upsample_size": forward_upsample_size, "latent_shift_frames": latent_shift_frames,
               "carry_skips": carry_skips}
    if sample_shape is not None:
        message["sample_shape"] = list(sample_shape)
    if freeu is not None:
        message["freeu"] = dict(freeu)
    if processors:
        message["processors"] = dict(processors)
    if feature_bytes:
        message["feature_bytes"] = int(feature_bytes)
    if adapters:  # LoRA adapters and their weights (swarm/blocks/unet_adapters.py)
        message["adapters"] = [[name, float(weight)] for name, weight in adapters]
    return message


def link(downstream: dict | None, upstream: str | None) -> dict:
    """Where a session pushes its outputs (peer, session_id, start, end) and whose pushes it accepts."""
    return {"type": "link", "downstream": downstream, "upstream": upstream}


def close(receipt: dict | None = None) -> dict:
    return {"type": "close"} if receipt is None else {"type": "close", "receipt": receipt}


def push(session_id: str, step: dict) -> dict:
    return {"session_id": session_id, "step": step}


def levels_pass(kind: str, step_id: int, sample: list | dict, input_sizes: list, output_codec: str,
                **extra: object) -> dict:
    """A ``down`` pass (with ``temb``) or an ``up`` pass of one U-Net evaluation; ``sample`` is encoded."""
    return {"type": kind, "step_id": step_id, "sample": sample, "input_sizes": input_sizes,
            "output_codec": output_codec, **extra}


# ---- readers (the server's side)


def read_tensor(message: dict, name: str, max_numel: int, required: bool = True) -> torch.Tensor | None:
    if message.get(name) is None:
        if required:
            raise RequestError(f"missing tensor {name!r}")
        return None
    try:
        return deserialize_tensor(message[name], max_numel=max_numel)
    except PayloadError as e:
        raise RequestError(f"bad tensor {name!r}: {e}") from None


def read_float_tensor(message: dict, name: str, max_numel: int, rank: int, required: bool = True,
                      layout: str = "") -> torch.Tensor | None:
    """A floating-point tensor of ``rank`` dimensions, none of them empty, with finite values only."""
    tensor = read_tensor(message, name, max_numel, required)
    if tensor is None:
        return None
    if tensor.dim() != rank:
        raise RequestError(f"{name} must have rank {rank}{f' ({layout})' if layout else ''}, got shape "
                           f"{list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise RequestError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if 0 in tensor.shape:
        raise RequestError(f"{name} is empty (shape {list(tensor.shape)})")
    if not torch.isfinite(tensor).all():
        raise RequestError(f"{name} contains NaN or infinite values")
    return tensor


def read_active_adapter(message: dict) -> str | None:
    """The LoRA adapter a request asks for (None: the base model); the blocks check that they serve it."""
    name = get_field(message, "active_adapter", str, default=None)
    if name is not None and not 0 < len(name) <= 256:
        raise RequestError(f"active_adapter must be a name of 1 to 256 characters, got {len(name)}")
    return name


def read_block_range(message: dict, served_start: int, served_end: int) -> tuple[int, int]:
    start, end = get_field(message, "start", int), get_field(message, "end", int)
    if not (served_start <= start < end <= served_end):
        raise RequestError(f"blocks {start}:{end} are not served here (this server holds {served_start}:{served_end})")
    return start, end


def read_hidden(message: dict, hidden_size: int, max_tokens: int, name: str = "hidden") -> torch.Tensor:
    hidden = read_float_tensor(message, name, max_tokens * hidden_size, 3, layout="batch, tokens, hidden")
    if hidden.shape[-1] != hidden_size:
        raise RequestError(f"{name} has hidden size {hidden.shape[-1]}, this model's is {hidden_size}")
    return hidden


def read_prompts(message: dict, layers: int, batch: int, tokens: int, hidden_size: int) -> torch.Tensor | None:
    """Deep prompts of a request (optional): (layers, 1 or batch, prompt length <= tokens, hidden), one per block,
    added to the first positions' hidden states before that block."""
    prompts = read_float_tensor(message, "prompts", layers * batch * tokens * hidden_size, 4, required=False,
                                layout="blocks, batch, prompt length, hidden")
    if prompts is None:
        return None
    if prompts.shape[0] != layers or prompts.shape[1] not in (1, batch) or prompts.shape[2] > tokens \
            or prompts.shape[3] != hidden_size:
        raise RequestError(f"prompts must have shape [{layers}, 1 or {batch}, <= {tokens}, {hidden_size}] (one per "
                           f"block requested), got {list(prompts.shape)}")
    return prompts


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


def read_sizes(message: dict, name: str = "input_sizes") -> list[list[int]]:
    sizes = message.get(name)
    if not isinstance(sizes, list) or not all(isinstance(s, list) and len(s) == 2 and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s) for s in sizes):
        raise RequestError(f"{name} must be a list of [height, width]")
    return sizes


def read_kind(message: dict, allowed: tuple[str, ...]) -> str:
    kind = get_field(message, "type", str)
    if kind not in allowed:
        raise RequestError(f"expected {', '.join(repr(k) for k in allowed[:-1])} or {allowed[-1]!r}, got {kind!r}")
    return kind
