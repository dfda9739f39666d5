"""How fast this server computes its span, measured once per (model, span length, device, dtype, quantization).

Two figures are announced: ``inference_rps``, decode steps per second over the whole span at batch 1 (one new
token against a warm cache), and ``forward_tps``, tokens per second of a prefill-size forward over the span.
They are cached on disk so a restart does not re-measure.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from swarm.blocks.served import SpanSpeed
from swarm.blocks.span import BlockSpan
from swarm.utils.cache import cache_root

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores, threads = os.cpu_count(), torch.get_num_threads()
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-{cores}cores-{threads}threads"


def measure_span_speed(span: BlockSpan, prefill_tokens: int = 256, decode_steps: int = 16) -> SpanSpeed:
    """Time the span on random hidden states (the numbers do not depend on the values)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(1, prefill_tokens, span.hidden_size, generator=generator).to(span.device, span.dtype)
    positions = torch.arange(prefill_tokens, device=span.device)[None]
    with torch.no_grad():
        span(hidden[:, :8], positions[:, :8])  # warm-up: lazy initializations, allocator
        started = time.perf_counter()
        span(hidden, positions)
        forward_tps = prefill_tokens / (time.perf_counter() - started)

        cache = span.new_cache()
        span(hidden[:, :32], positions[:, :32], cache=cache)
        started = time.perf_counter()
        for step in range(decode_steps):
            position = positions[:, 32 + step : 33 + step]
            span(hidden[:, step : step + 1], position, cache=cache)
        inference_rps = decode_steps / (time.perf_counter() - started)
    return SpanSpeed(inference_rps=inference_rps, forward_tps=forward_tps)


def get_span_speed(span: BlockSpan, model_id: str, cache_path: Path | None = None,
                   force: bool = False) -> SpanSpeed:
    """The span's speed from the on-disk cache, measuring (and caching) it when absent or ``force``."""
    from filelock import FileLock

    cache_path = cache_path or cache_root() / "throughput.json"
    key = "|".join([f"v{CACHE_VERSION}", model_id, str(span.end - span.start), device_name(span.device),
                    str(span.dtype).removeprefix("torch."), span.quantization])
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_path) + ".lock"):
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        if key in cache and not force:
            return SpanSpeed(**cache[key])
        logger.info(f"Measuring the speed of {span.end - span.start} blocks (cached in {cache_path})...")
        speed = measure_span_speed(span)
        cache[key] = asdict(speed)
        cache_path.write_text(json.dumps(cache, indent=1))
    logger.info(f"Span speed: {speed.inference_rps:.1f} decode steps/s, {speed.forward_tps:.0f} tokens/s forward")
    return speed
