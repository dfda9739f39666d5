"""A span's decoder layers restated for zero-knowledge circuits: the same function, in operations ezkl can prove.

transformers' layers build their causal mask with the dtype's most negative float and compute rotary embeddings
from positions at run time; ezkl's fixed-point circuits overflow on the first ("significant bit truncation") and
cannot take the second. ``ProvableSpan`` computes the same layers over a fixed number of positions (0..length-1,
one sequence, no padding) with a finite mask (-30 before the softmax: a weight of e^-30 relative, below float32's
resolution of the result), rotary tables as constants and grouped key/value heads expanded into the weights. In
float32 it equals the span's own forward to float rounding (checked by tests/test_zk_swarm.py).
"""

from __future__ import annotations

import torch
from torch import nn

MASKED = -30.0  # added to a masked attention score before the softmax
FAMILIES = ("llama", "mistral", "qwen2")  # RMSNorm, rotary, gated SiLU MLP: the layers this module restates
# The circuits' fixed-point scale (log2), the same for provers and verifiers (their circuits must be identical):
# at 2^-8 the lookup tables of exp/rsqrt/SiLU fit in 2^15 rows for a hidden-16 block; ezkl's own choice (2^-11)
# needs 2^18 rows, 8x the keys and proving time, for an error of 0.0015 instead of 0.017.
PROOF_SCALES = [8]


class ProvableLayer(nn.Module):
    """One Llama-style decoder layer over positions 0..length-1 of one sequence."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, length: int):
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        self.heads, self.head_dim = attention.config.num_attention_heads, attention.head_dim
        groups = self.heads // attention.config.num_key_value_heads
        self.scaling, self.length = float(attention.scaling), length
        self.eps = tuple(float(norm.variance_epsilon)
                         for norm in (layer.input_layernorm, layer.post_attention_layernorm))

        def weight(linear: nn.Linear, groups: int = 1) -> nn.Parameter:  # (in, out), key/value heads repeated
            w = linear.weight.detach().float().T
            if groups > 1:
                w = w.reshape(w.shape[0], -1, 1, self.head_dim).expand(-1, -1, groups, -1).reshape(w.shape[0], -1)
            return nn.Parameter(w.contiguous().clone(), requires_grad=False)

        def bias(linear: nn.Linear, groups: int = 1) -> nn.Parameter:
            b = linear.bias.detach().float() if linear.bias is not None else torch.zeros(linear.out_features)
            if groups > 1:
                b = b.reshape(-1, 1, self.head_dim).expand(-1, groups, -1).reshape(-1)
            return nn.Parameter(b.contiguous().clone(), requires_grad=False)

        self.norm1 = nn.Parameter(layer.input_layernorm.weight.detach().float().clone(), requires_grad=False)
        self.norm2 = nn.Parameter(layer.post_attention_layernorm.weight.detach().float().clone(), requires_grad=False)
        self.wq, self.bq = weight(attention.q_proj), bias(attention.q_proj)
        self.wk, self.bk = weight(attention.k_proj, groups), bias(attention.k_proj, groups)
        self.wv, self.bv = weight(attention.v_proj, groups), bias(attention.v_proj, groups)
        self.wo = weight(attention.o_proj)
        self.gate, self.up, self.down = weight(mlp.gate_proj), weight(mlp.up_proj), weight(mlp.down_proj)
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, length, 1), torch.arange(length)[None])
        self.register_buffer("cos", cos[0].float().clone())  # (length, head_dim)
        self.register_buffer("sin", sin[0].float().clone())
        half = self.head_dim // 2
        rotate = torch.zeros(self.head_dim, self.head_dim)  # x @ rotate == cat(-x[half:], x[:half])
        rotate[half:, :half] = -torch.eye(half)
        rotate[:half, half:] = torch.eye(half)
        self.register_buffer("rotate", rotate)
        self.register_buffer("mask", torch.triu(torch.full((length, length), MASKED), diagonal=1))

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (length, hidden)
        length, heads, dim = self.length, self.heads, self.head_dim
        h = self.rms_norm(x, self.norm1, self.eps[0])
        q = (h @ self.wq + self.bq).reshape(length, heads, dim).transpose(0, 1)
        k = (h @ self.wk + self.bk).reshape(length, heads, dim).transpose(0, 1)
        v = (h @ self.wv + self.bv).reshape(length, heads, dim).transpose(0, 1)
        q = q * self.cos + (q @ self.rotate) * self.sin
        k = k * self.cos + (k @ self.rotate) * self.sin
        weights = torch.softmax((q @ k.transpose(1, 2)) * self.scaling + self.mask, dim=-1)
        x = x + (weights @ v).transpose(0, 1).reshape(length, heads * dim) @ self.wo
        h = self.rms_norm(x, self.norm2, self.eps[1])
        return x + (torch.nn.functional.silu(h @ self.gate) * (h @ self.up)) @ self.down


class ProvableSpan(nn.Module):
    """``span``'s local layers [first, last) (default: all) on hidden states of shape (1, length, hidden) at
    positions 0..length-1."""

    def __init__(self, span: nn.Module, length: int, first: int = 0, last: int | None = None):
        super().__init__()
        family = span.config.model_type
        if family not in FAMILIES:
            raise ValueError(f"proofs are made for {', '.join(FAMILIES)} blocks; these are {family}")
        if span.quantization != "none" or span.dtype != torch.float32:
            raise ValueError("proofs are made for float32 blocks without quantization (the circuit computes in "
                             f"fixed point from float weights); these are {span.dtype} / {span.quantization}")
        last = len(span.layers) if last is None else last
        if any(kind != "full_attention" for kind in span.layer_types[first:last]):
            raise ValueError("proofs are made for full-attention layers only (no sliding windows)")
        self.length = length
        self.layers = nn.ModuleList(ProvableLayer(layer, span.rotary, length) for layer in span.layers[first:last])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden[0]
        for layer in self.layers:
            x = layer(x)
        return x[None]
