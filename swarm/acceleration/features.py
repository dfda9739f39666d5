"""What describes a request for the acceleration learner: the model, the hardware, the request and the network.

Features are measured, not declared: RTTs and bandwidth come from probes to the servers of the chain the request
would take now, the hardware from this machine. The same function builds them when the history is collected and
when a method is chosen, so training and use see the same quantities.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from swarm.rpc import protocol
from swarm.rpc.client import call

BANDWIDTH_PROBE_BYTES = 64 * 1024  # an info request padded this much: its extra time is transfer time


@dataclass(frozen=True)
class TaskFeatures:
    model_params: float  # parameters of the whole model
    num_blocks: int
    hidden_size: int
    dtype_bytes: int
    cpu_cores: int  # of the client machine
    gpu: int  # 1 if the client has a CUDA device
    batch_size: int
    prompt_length: int
    new_tokens: int
    chain_length: int  # servers in the chain
    rtt_ms: float  # mean round trip to the chain's servers
    bandwidth_mbit: float  # slowest measured link to the chain's servers

    def vector(self) -> list[float]:
        """Numbers for the learner: sizes on log scales, where their effects are multiplicative."""
        return [math.log10(max(self.model_params, 1.0)), float(self.num_blocks), math.log2(max(self.hidden_size, 1)),
                float(self.dtype_bytes), math.log2(max(self.cpu_cores, 1)), float(self.gpu),
                math.log2(max(self.batch_size, 1)), math.log2(max(self.prompt_length, 1)),
                math.log2(max(self.new_tokens, 1)), float(self.chain_length), math.log1p(self.rtt_ms),
                math.log1p(self.bandwidth_mbit)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskFeatures:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


FEATURE_NAMES = ["log10_params", "blocks", "log2_hidden", "dtype_bytes", "log2_cores", "gpu", "log2_batch",
                 "log2_prompt", "log2_new_tokens", "chain_length", "log1p_rtt_ms", "log1p_mbit"]


def hardware() -> dict:
    """This machine, as the history records it."""
    gpu = torch.cuda.is_available()
    return {"cpu_cores": os.cpu_count() or 1, "gpu": int(gpu),
            "device": torch.cuda.get_device_name(0) if gpu else "cpu"}


async def probe_link(p2p, peer: str, timeout: float = 10.0) -> tuple[float, float]:
    """(RTT in ms, bandwidth in Mbit/s) to ``peer``: an empty info call, then one padded with
    ``BANDWIDTH_PROBE_BYTES`` (the server ignores the padding); the extra time is the padding's transfer time."""
    rtts, padded = [], []
    for _ in range(3):  # the best of three: a probe can be delayed by other traffic, never sped up
        started = time.perf_counter()
        await call(p2p, peer, protocol.INFO, {}, timeout=timeout)
        rtts.append(time.perf_counter() - started)
        started = time.perf_counter()
        await call(p2p, peer, protocol.INFO, {"padding": b"\0" * BANDWIDTH_PROBE_BYTES}, timeout=timeout)
        padded.append(time.perf_counter() - started)
    rtt, extra = min(rtts), max(min(padded) - min(rtts), 1e-4)
    return rtt * 1000, min(BANDWIDTH_PROBE_BYTES * 8 / extra / 1e6, 10_000.0)


async def probe_chain(p2p, peers: list[str]) -> tuple[float, float]:
    """Mean RTT (ms) and the slowest bandwidth (Mbit/s) over the servers of a chain."""
    links = await asyncio.gather(*(probe_link(p2p, peer) for peer in peers))
    return sum(rtt for rtt, _ in links) / len(links), min(mbit for _, mbit in links)


def task_features(model, batch_size: int, prompt_length: int, new_tokens: int, chain: list[str],
                  link: tuple[float, float]) -> TaskFeatures:
    """Features of generating ``new_tokens`` after a ``batch_size`` x ``prompt_length`` prompt with ``model``
    (a distributed model) through ``chain`` (peer ids), whose links measured ``link`` = (RTT ms, Mbit/s)."""
    config = model.config
    params = _model_params(config)
    hw = hardware()
    dtype = next(model.parameters()).dtype
    return TaskFeatures(model_params=params, num_blocks=config.num_hidden_layers, hidden_size=config.hidden_size,
                        dtype_bytes=torch.finfo(dtype).bits // 8, cpu_cores=hw["cpu_cores"], gpu=hw["gpu"],
                        batch_size=batch_size, prompt_length=prompt_length, new_tokens=new_tokens,
                        chain_length=len(chain), rtt_ms=link[0], bandwidth_mbit=link[1])


def _model_params(config) -> float:
    """Parameters of the whole model from its config (the client holds only a part of the weights)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * inner if hasattr(config, "intermediate_size") else 2 * hidden * inner
    return float(layers * (attention + mlp) + config.vocab_size * hidden)
