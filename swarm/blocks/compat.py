"""Every transformers call whose spelling drifts inside 5.x, in one place.

Written and tested against transformers 5.24.0 (pinned in pyproject.toml). Known drift inside 5.x:
the cache keyword is ``past_key_values=`` up to 5.2x and ``cache=`` from 5.24; ``cache_position`` is gone
since 5.20; ``create_causal_mask`` took ``input_embeds``/``past_key_values`` in 5.0; ``DynamicCache.crop``
took a final length in 5.0 and a negative count of tokens to remove since 5.20.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

TESTED_TRANSFORMERS = "5.24.0"

_MASK_BUILDERS: dict[str, Callable] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def layer_types(config: PretrainedConfig) -> list[str]:
    """Attention type of every layer ("full_attention", "sliding_attention", ...) as transformers infers it."""
    types, _ = get_layer_types_and_kwargs(config)
    return list(types)


def check_supported_layer_types(types: list[str]) -> None:
    unsupported = sorted(set(types) - set(_MASK_BUILDERS))
    if unsupported:
        raise NotImplementedError(
            f"layer types {unsupported} are not supported yet (supported: {sorted(_MASK_BUILDERS)})"
        )


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty KV cache laid out for ``config``'s layers (sliding-window layers keep only their window)."""
    return DynamicCache(config=config)


def attention_masks(
    config: PretrainedConfig,
    types: list[str],
    first: int,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: DynamicCache | None,
    position_ids: torch.Tensor,
) -> dict[str, object]:
    """One attention mask per layer type among ``types`` (the types of the layers about to run, the first of which
    is layer ``first`` of the cache).

    Each mask is sized from the first cache layer of its type: when a session runs only the end of a server's span,
    the cache's earlier layers stay empty, and sizing from layer 0 would silently break padded batches.
    """
    masks = {}
    for kind in dict.fromkeys(types):
        masks[kind] = _MASK_BUILDERS[kind](
            config=config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            layer_idx=first + types.index(kind) if cache is not None else None,
            **{CACHE_KWARG: cache},
        )
    return masks


def call_layer(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    *,
    mask: object,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    cache: DynamicCache | None,
) -> torch.Tensor:
    """Run one decoder layer; returns the hidden states (5.x layers return a tensor, older ones a tuple)."""
    kwargs = dict(attention_mask=mask, position_ids=position_ids, use_cache=cache is not None)
    kwargs[CACHE_KWARG] = cache
    if position_embeddings is not None:
        kwargs["position_embeddings"] = position_embeddings
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def cache_layer_lengths(cache: DynamicCache) -> list[int]:
    return [layer.get_seq_length() for layer in cache.layers]


# A sliding-window layer that already dropped positions cannot be cut back to them: clients rebuild the session
# from the history they keep (swarm/client/inference_session.py) when a server's error says so.
REWIND_REFUSED = "cannot rewind this cache"


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Drop every cached position at or after ``length``, layer by layer.

    Per layer because a step that failed half-way has written to its first layers only.
    """
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            try:
                layer.crop(-extra)
            except RuntimeError as e:  # a sliding-window layer that already dropped those positions
                raise ValueError(f"{REWIND_REFUSED} to position {length}: {e}") from e


def reorder_cache(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Make batch row i continue the hypothesis that was in row ``rows[i]`` (beam search)."""
    cache.reorder_cache(rows)


# ---- decode steps of several sessions run as one batch (swarm/server/batching.py)


def is_mergeable(cache: DynamicCache) -> bool:
    """Whether ``cache`` holds plain growing full-attention layers only: the kind that ``merge_caches`` pads.
    Sliding-window layers drop old positions by themselves, so padding them to a common length would be wrong."""
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def merge_caches(config: PretrainedConfig, caches: list[DynamicCache], rows: list[int], length: int,
                 first: int, last: int) -> DynamicCache:
    """A new cache whose layers [first, last) stack ``caches`` along the batch (``rows[i]`` rows each), every one
    left-padded with zeros to ``length`` positions; the caller masks the padding out.

    Each cache's layers [first, last) must hold the same number of positions (at most ``length``).
    """
    merged = DynamicCache(config=config)
    for index in range(first, last):
        parts = [cache.layers[index] for cache in caches]
        shaped = next((p for p in parts if p.get_seq_length() > 0), None)
        if shaped is None:
            continue  # nothing cached anywhere yet: the layer initializes itself from the new tokens
        batch, (_, heads, _, width) = sum(rows), shaped.keys.shape
        keys = shaped.keys.new_zeros(batch, heads, length, width)
        values = shaped.values.new_zeros(batch, heads, length, shaped.values.shape[-1])
        row = 0
        for part, count in zip(parts, rows, strict=True):
            cached = part.get_seq_length()
            if cached:
                keys[row:row + count, :, length - cached:] = part.keys
                values[row:row + count, :, length - cached:] = part.values
            row += count
        layer = merged.layers[index]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return merged


def append_from_merged(merged: DynamicCache, caches: list[DynamicCache], rows: list[int], tokens: int,
                       first: int, last: int) -> None:
    """Append to each of ``caches`` the last ``tokens`` positions of its rows in ``merged`` (what the batched call
    added), the same growth an unbatched call would have made."""
    for index in range(first, last):
        layer, row = merged.layers[index], 0
        for cache, count in zip(caches, rows, strict=True):
            rows_of = slice(row, row + count)
            cache.layers[index].update(layer.keys[rows_of, :, -tokens:], layer.values[rows_of, :, -tokens:])
            row += count
