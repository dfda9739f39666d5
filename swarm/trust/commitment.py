"""A short commitment to a step's output, so that it can be checked later without resending the tensor.

For every position, the indices of the hidden state's ``k`` largest magnitudes (as a set) are hashed together:
16 hex characters per reply. An honest recomputation of the same step (another server, a later replay, even
through an 8-bit codec) finds the same top-k sets unless two magnitudes are nearly tied.

What it proves: the server committed, at the time, to an output whose dominant dimensions are these; a server
that returns something else (random tensors, large perturbations, another layer's output) is caught by a later
recomputation with high probability. What it does not prove: the exact values. Small perturbations that keep each
position's top-k set, and outputs that were wrong in the same way when committed, pass; near-ties can make an
honest output mismatch, so a mismatch is evidence to be confirmed by a direct comparison, not a verdict alone.
"""

from __future__ import annotations

import hashlib

import torch

TOP_K = 8


def commit(hidden: torch.Tensor, k: int = TOP_K) -> str:
    """Commitment to ``hidden`` of shape (..., positions, width)."""
    flat = hidden.detach().float().reshape(-1, hidden.shape[-1])
    top = flat.abs().topk(min(k, flat.shape[-1]), dim=-1).indices.sort(dim=-1).values
    return hashlib.sha256(top.to(torch.int32).cpu().numpy().tobytes()).hexdigest()[:16]


def matches(commitment: str, recomputed: torch.Tensor, k: int = TOP_K) -> bool:
    return commit(recomputed, k) == commitment
