"""Commitments to the exact weights a server serves: a two-level hash tree (tensors -> block -> span).

A block's hash covers each of its tensors (sorted by name) as served: name, dtype, shape and raw bytes (the dtype the
server computes in; quantized weights as quantized). A span's commitment hashes its first block index and its blocks'
hashes in order, so anyone holding the checkpoint can compute the commitment of any span from per-block hashes
(``python -m swarm.verify commit``) and compare it with the one a server signs into its DHT record.

What it proves: a server announcing the reference commitment claims, under its signature, to serve exactly those
weights; a server that changed even one weight (fine-tuned, quantized otherwise, corrupted) announces another one,
or lies. What it does not prove: that the server computes with the weights it committed to; sampled proofs
(swarm/trust/zk.py) and redundant recomputation (swarm/client/verification.py) check that.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

HEX_LENGTH = 64  # sha256
_HEX = re.compile(r"[0-9a-f]{64}")


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw bytes of ``tensor`` in its own dtype, row-major, little-endian (as CPUs store them)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def block_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hash of one block's tensors (a ``state_dict``: names relative to the block)."""
    digest = hashlib.sha256(b"swarm.block.v1")
    for name in sorted(tensors):
        tensor = tensors[name]
        header = f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        data = tensor_bytes(tensor)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def span_commitment(start: int, hashes: Sequence[str]) -> str:
    """Commitment to blocks ``start .. start + len(hashes) - 1`` from their block hashes."""
    if not hashes:
        raise ValueError("a span has at least one block")
    digest = hashlib.sha256(f"swarm.span.v1|{start}|{len(hashes)}".encode())
    for value in hashes:
        digest.update(bytes.fromhex(value))
    return digest.hexdigest()


def module_commitment(start: int, blocks: Iterable[torch.nn.Module]) -> str:
    """Commitment to served blocks (modules numbered from ``start``), from their state as they are now."""
    return span_commitment(start, [block_hash(block.state_dict()) for block in blocks])


def is_commitment(value: object) -> bool:
    return isinstance(value, str) and _HEX.fullmatch(value) is not None


@dataclass
class ReferenceWeights:
    """The commitments a client accepts: from per-block hashes it computes from its own copy of the checkpoint
    (``block_hashes(dtype, quantization)``, called once per kind of weights and cached) and/or a list it trusts
    (``trusted``: "START:END" or "START:END:DTYPE:QUANTIZATION" -> commitment)."""

    block_hashes: Callable[[str, str], Sequence[str] | Mapping[int, str] | None] | None = None
    trusted: Mapping[str, str] = field(default_factory=dict)
    _cache: dict[tuple[str, str], Sequence[str] | Mapping[int, str] | None] = field(default_factory=dict, repr=False)

    def expected(self, start: int, end: int, dtype: str, quantization: str) -> str | None:
        """The commitment a server holding blocks [start, end) in ``dtype`` with ``quantization`` must announce;
        None if this reference cannot tell."""
        for key in (f"{start}:{end}:{dtype}:{quantization}", f"{start}:{end}"):
            if key in self.trusted:
                return self.trusted[key]
        if self.block_hashes is None:
            return None
        kind = (dtype, quantization)
        if kind not in self._cache:
            self._cache[kind] = self.block_hashes(dtype, quantization)
        hashes = self._cache[kind]
        try:
            return None if hashes is None else span_commitment(start, [hashes[i] for i in range(start, end)])
        except (IndexError, KeyError):
            return None

    @classmethod
    def from_published(cls, documents: Iterable[Mapping]) -> ReferenceWeights:
        """From what ``python -m swarm.verify commit MODEL --json`` prints (one document per dtype/quantization):
        ``{"span": "START:END", "dtype", "quantization", "blocks": [block hashes]}``."""
        kinds: dict[tuple[str, str], dict[int, str]] = {}
        for document in documents:
            try:
                start, end = (int(part) for part in str(document["span"]).split(":"))
                blocks, kind = document["blocks"], (str(document["dtype"]), str(document["quantization"]))
                if not (isinstance(blocks, list) and len(blocks) == end - start and all(map(is_commitment, blocks))):
                    raise ValueError("blocks: one 64-hex-digit hash per block of the span")
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"not a published weights document ({e}): {str(document)[:200]}") from None
            kinds.setdefault(kind, {}).update(zip(range(start, end), blocks, strict=True))
        return cls(block_hashes=lambda dtype, quantization: kinds.get((dtype, quantization)))

    def mismatch(self, start: int, end: int, dtype: str, quantization: str, announced: str) -> str | None:
        """Why a server's announced commitment is not acceptable, or None if it matches."""
        expected = self.expected(start, end, dtype, quantization)
        if expected is None:
            return f"no reference weights for blocks {start}:{end} ({dtype}, {quantization})"
        if not announced:
            return "announces no weights commitment"
        if announced != expected:
            return f"weights commitment {announced[:12]}.. differs from the reference {expected[:12]}.."
        return None
