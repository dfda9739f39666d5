"""Dynamic blockwise 8-bit quantization (Dettmers et al., "8-bit Optimizers via Block-wise Quantization").

Each block of ``block`` values is scaled by its absolute maximum and every value is replaced by the index of the
nearest entry of the *dynamic* code: a signed, non-linear 8-bit code that spends its precision near zero (one
decade per exponent level). That keeps LLM hidden states with outlier dimensions usable where linear absmax int8
does not. bitsandbytes does the work when it imports; a vectorized torch path produces the same format otherwise.

The code is not idempotent: quantize a tensor once per hop, never a tensor that was itself dequantized.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

logger = logging.getLogger(__name__)

BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts; also accepted from peers


@functools.cache
def dynamic_code() -> torch.Tensor:
    """The 256 values of the signed dynamic code, ascending: 0, 1, and for each exponent level k = 0..6,
    2**k fractions (midpoints of an even split of [0.1, 1]) times 10**(k - 6), with both signs."""
    values = [0.0, 1.0]
    for level in range(7):
        edges = torch.linspace(0.1, 1.0, 2**level + 1)
        scaled = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (level - 6)  # float32, as bitsandbytes rounds it
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _bnb():
    """bitsandbytes.functional, or None where it cannot be imported (its import takes ~2-3 s: warm it early)."""
    # Its import warns that an optional 4-bit CPU kernel package is missing: irrelevant to 8-bit codes.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional
    except Exception as e:  # missing wheel, unsupported platform, broken native library
        logger.warning(f"bitsandbytes unavailable ({e}); using the torch implementation of blockwise 8-bit")
        return None


def warm_up() -> None:
    """Import bitsandbytes and run it once, so the first real request does not pay for it."""
    quantize(torch.zeros(8), 64)


def quantize(tensor: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like the flat tensor, float32 absmax per block)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.float32)
    bnb = _bnb()
    if bnb is not None and flat.dtype in (torch.float32, torch.float16, torch.bfloat16):
        codes, state = bnb.quantize_blockwise(flat.contiguous(), code=dynamic_code(), blocksize=block)
        return codes.reshape(-1), state.absmax.float()
    return _quantize_torch(flat.float(), block)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Flat tensor of ``dtype`` from ``quantize``'s output."""
    if codes.numel() == 0:
        return torch.empty(0, dtype=dtype)
    bnb = _bnb()
    if bnb is not None and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return bnb.dequantize_blockwise(codes, absmax=absmax, code=dynamic_code(), blocksize=block).to(dtype)
    return _dequantize_torch(codes, absmax, block).to(dtype)


def _blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    padding = (-flat.numel()) % block
    return torch.nn.functional.pad(flat, (0, padding)).view(-1, block)


def _quantize_torch(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocks(flat, block)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    code = dynamic_code()
    upper = torch.searchsorted(code, normalized.contiguous()).clamp(1, code.numel() - 1)
    nearer_lower = (normalized - code[upper - 1]) < (code[upper] - normalized)
    codes = (upper - nearer_lower.long()).to(torch.uint8)
    return codes.reshape(-1)[: flat.numel()], absmax


def _dequantize_torch(codes: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    values = dynamic_code()[codes.long()]
    return (_blocks(values, block) * absmax[:, None]).reshape(-1)[: codes.numel()]


def num_blocks(numel: int, block: int) -> int:
    return math.ceil(numel / block)
