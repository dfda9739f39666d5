"""The weights commitment of served blocks (swarm/trust/weights.py), from a loaded span or from a checkpoint.

Both sides load blocks through the same code (``BlockSpan.from_pretrained``, ``UNetLevels.from_pretrained``), so the
reference a client computes from its own copy of the checkpoint equals what an honest server announces, also for
another dtype or quantized weights.
"""

from __future__ import annotations

import torch

from swarm.blocks.span import BlockSpan
from swarm.hub.source import ModelSource, resolve_model
from swarm.trust.weights import ReferenceWeights, block_hash, is_commitment, span_commitment

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def block_states(span: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """One state dict per served block (a decoder layer; a U-Net level: its down and up blocks, or the mid block)."""
    if isinstance(span, BlockSpan):
        return [layer.state_dict() for layer in span.layers]
    from swarm.blocks.unet import level_paths  # diffusers only where U-Nets are served

    states = []
    unet, n = span.unet, span.n
    for level in range(span.start, span.end):
        states.append({f"{path}.{name}": value for path in level_paths(n, level)
                       for name, value in unet.get_submodule(path).state_dict().items()})
    return states


def span_weights_commitment(span: torch.nn.Module) -> str:
    """What a server serving ``span`` announces (adapters, served beside the base weights, are not included)."""
    return span_commitment(span.start, [block_hash(state) for state in block_states(span)])


def checkpoint_block_hashes(model: str | ModelSource, dtype: str = "float32", quantization: str = "none",
                            blocks: range | None = None) -> list[str]:
    """Hash of every block of a checkpoint (or of ``blocks``) as a server with this dtype and quantization serves
    it, loading one block at a time."""
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    unet = source.is_diffusers_layout() and _is_unet(source)
    if blocks is None:
        blocks = range(_block_count(source, unet))
    hashes = []
    for index in blocks:
        if unet:
            from swarm.blocks.unet import UNetLevels

            if quantization != "none":
                raise ValueError("U-Net levels are served without weight quantization")
            span = UNetLevels.from_pretrained(source, index, index + 1, dtype=DTYPES[dtype])
        else:
            span = BlockSpan.from_pretrained(source, index, index + 1, dtype=DTYPES[dtype], quantization=quantization)
        hashes.append(block_hash(block_states(span)[0]))
        del span
    return hashes


def _is_unet(source: ModelSource) -> bool:
    from swarm.blocks.unet import is_unet_source  # diffusers: imported only for diffusers layouts

    return is_unet_source(source)


def _block_count(source: ModelSource, unet: bool) -> int:
    if unet:
        from swarm.blocks.unet import build_unet_skeleton, load_unet_config

        return len(build_unet_skeleton(load_unet_config(source)[0]).down_blocks) + 1
    from swarm.blocks.span import load_config

    return load_config(source).num_hidden_layers


def reference_weights(require: str | dict[str, str] | ReferenceWeights,
                      own: str | ModelSource | None = None) -> ReferenceWeights:
    """``ClientConfig.require_weights`` as a ``ReferenceWeights``: "reference" (the checkpoint ``own`` the client
    loads), a checkpoint's path or hub name, or trusted commitments by span. Hashes are computed on first use, once
    per dtype and quantization that servers announce."""
    if isinstance(require, ReferenceWeights):
        return require
    if isinstance(require, dict):
        bad = [key for key, value in require.items() if not isinstance(key, str) or not is_commitment(value)]
        if bad:
            raise ValueError(f"require_weights: not a 64-hex-digit sha256 commitment for {bad}")
        return ReferenceWeights(trusted=dict(require))
    if require == "reference":
        if own is None:
            raise ValueError('require_weights="reference" needs the checkpoint the client loaded')
        require = own
    source = require if isinstance(require, ModelSource) else resolve_model(require)
    return ReferenceWeights(block_hashes=lambda dtype, quantization: checkpoint_block_hashes(source, dtype,
                                                                                           quantization))
