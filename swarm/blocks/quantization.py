"""Weight quantization of a span's linear layers through bitsandbytes: LLM.int8 (``int8``) and 4-bit NF4 (``nf4``).

On CPU the point is memory, not speed: both run slower than float32 there.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8", "nf4")
PRECISION_ORDER = {"nf4": 0, "int8": 1, "none": 2, "float": 2}  # higher keeps more precision; float = none


def meets_precision(quantization: str, minimum: str) -> bool:
    """Whether a server quantized as ``quantization`` is acceptable to a client asking for at least ``minimum``
    ("nf4": any, "int8": no 4-bit, "float": unquantized weights only). Unknown quantizations never qualify."""
    return PRECISION_ORDER.get(quantization, -1) >= PRECISION_ORDER[minimum]


def quantize_linear_layers(module: nn.Module, mode: str, compute_dtype: torch.dtype,
                           device: str | torch.device) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by its bitsandbytes counterpart; returns how many."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {QUANTIZATIONS}")
    if mode == "none":
        return 0
    # bitsandbytes warns at import about an optional 4-bit CPU kernel package, and on every int8 call about casting
    # inputs to float16: neither is actionable here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            has_bias = child.bias is not None
            if mode == "int8":
                # threshold 6.0: LLM.int8 mixed decomposition, outlier input dimensions stay in 16-bit
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                        compute_dtype=compute_dtype, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if has_bias:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            # moving the parameters quantizes them; eval(): in training mode Linear8bitLt dequantizes the weights
            # and runs a slow float matmul instead of the int8 one
            setattr(parent, name, new.to(device).eval())
            replaced += 1
    return replaced


def parameter_bytes(module: nn.Module) -> int:
    """Memory held by a module's parameters and buffers (quantized weights counted at their packed size)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
