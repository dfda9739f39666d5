"""Video longer than the transformer was trained on: a sliding window over time (TATS).

The model saw sequences of ``[prefix, frames 0..F-1]`` (``F = layout.frames``). To go past F frames, the oldest
``stride`` frames are dropped and generation continues with ``[prefix, the last F - stride frames]`` as context,
each frame back at the positions it would have in a training sequence.

What the servers keep: Llama rotates each cached key by its absolute position, and a server's cache can only be cut
at its end (a rewind), so a frame whose position changes must be computed again. The prefix (BOS, the description,
BOV) never moves: its keys and values stay in the servers' caches for the whole clip, and each slide rewinds the
session to the end of the prefix and re-sends the ``F - stride`` frames kept (one prefill). So a session never
holds more than ``prefix + F`` frames' positions, however long the clip, and the cost of the window is
``(F - stride) / stride`` frames re-sent per new frame (``LongVideo.tokens_resent``).

The same code runs a local transformers model (its ``DynamicCache`` cut the same way) and a swarm model (an
inference session: a server that dies mid-clip is replaced and its history replayed, so the clip is the same),
which is what makes the two comparable token for token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache

from swarm.blocks import compat
from swarm.video.transformer import TokenLayout


@dataclasses.dataclass
class LongVideo:
    codes: torch.Tensor  # (frames, h, w) VQ codes of the whole clip
    tokens_generated: int  # video tokens sampled
    tokens_sent: int  # positions the transformer computed (prefix, samples and re-sent windows)
    tokens_resent: int  # positions computed again after a slide (the window's cost)
    slides: int
    frames_past_window: int  # frames generated after the first window
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.seconds

    @property
    def resent_per_new_frame(self) -> float:
        """Tokens re-sent per frame generated past the first window."""
        return self.tokens_resent / max(1, self.frames_past_window)


class _LocalCache:
    """A transformers model with its own KV cache, rewound by cropping."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.cache = model, DynamicCache()

    def feed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        compat.truncate_cache(self.cache, start)
        positions = torch.arange(start, start + ids.shape[1])[None]
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{compat.CACHE_KWARG: self.cache})
        return out.logits[:, -1]


class _SessionCache:
    """A swarm model: the KV caches live on the servers, in one inference session rewound on a slide."""

    def __init__(self, model: torch.nn.Module, session: object):
        self.model, self.session = model, session

    def feed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        if self.session.position > start:
            self.session.rewind(start)
        positions = torch.arange(start, start + ids.shape[1])[None]
        return self.model(input_ids=ids, position_ids=positions, logits_to_keep=1).logits[:, -1]


@contextlib.contextmanager
def _cache_of(model: torch.nn.Module, max_length: int) -> Iterator[_LocalCache | _SessionCache]:
    if hasattr(model, "inference_session"):  # a swarm model (AutoDistributedModelForCausalLM)
        with model.inference_session(max_length=max_length) as session:
            yield _SessionCache(model, session)
    else:
        yield _LocalCache(model)


def sample_code(logits: torch.Tensor, layout: TokenLayout, generator: torch.Generator, top_k: int | None,
                temperature: float) -> int:
    """A video token from the last position's logits, only codes allowed (top-k, temperature; greedy at 0)."""
    codes = logits[0, layout.code_offset: layout.vocab_size].float()
    if temperature <= 0:
        return int(codes.argmax()) + layout.code_offset
    codes = codes / temperature
    if top_k is not None and top_k < codes.numel():
        threshold = torch.topk(codes, top_k).values[-1]
        codes = codes.masked_fill(codes < threshold, float("-inf"))
    probabilities = torch.softmax(codes, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator)) + layout.code_offset


@torch.inference_mode()
def generate_long_video(model: torch.nn.Module, text_ids: torch.Tensor | list[int], frames: int, *,
                        layout: TokenLayout | None = None, stride: int | None = None, top_k: int | None = 16,
                        temperature: float = 1.0, seed: int = 0,
                        on_frame: Callable[[int], None] | None = None) -> LongVideo:
    """``frames`` frames of codes for a description, any number of them: a window of the training length slides by
    ``stride`` frames (default: half of it) whenever it is full.

    ``model``: a transformers causal LM or a swarm one (``AutoDistributedModelForCausalLM``); the same seed gives
    the same clip on either. ``on_frame(i)`` is called once frame ``i`` is complete."""
    layout = layout or TokenLayout.of(model.config)
    window = layout.frames
    stride = stride if stride is not None else max(1, window // 2)
    if not 0 < stride <= window:
        raise ValueError(f"stride must lie in [1, {window}] (the training length in frames), got {stride}")
    if frames < 1:
        raise ValueError("frames must be at least 1")
    per_frame, prefix = layout.tokens_per_frame, layout.prefix(text_ids)[None]
    generator = torch.Generator().manual_seed(seed)
    video: list[int] = []  # every video token of the clip
    sent = resent = slides = 0
    began = time.perf_counter()
    with _cache_of(model, layout.sequence_length) as cache:
        logits = prefix_logits = cache.feed(prefix, 0)
        sent += prefix.shape[1]
        first = 0  # the frame the window starts at
        while len(video) < frames * per_frame:
            if len(video) == (first + window) * per_frame:  # the window is full: slide it
                first += stride
                kept = torch.tensor([video[first * per_frame:]], dtype=torch.long)
                slides += 1
                if kept.shape[1] == 0:  # (stride == window) a fresh window: the next token's feed rewinds
                    logits = prefix_logits
                else:
                    logits = cache.feed(kept, layout.prefix_length)
                    sent, resent = sent + kept.shape[1], resent + kept.shape[1]
            token = sample_code(logits, layout, generator, top_k, temperature)
            video.append(token)
            if len(video) % per_frame == 0 and on_frame is not None:
                on_frame(len(video) // per_frame - 1)
            if len(video) == frames * per_frame:
                break
            if len(video) == (first + window) * per_frame:
                continue  # the window is full: this token is fed with the window after the slide
            position = layout.prefix_length + len(video) - 1 - first * per_frame
            logits = cache.feed(torch.tensor([[token]]), position)
            sent += 1
    codes = layout.codes(torch.tensor(video))
    return LongVideo(codes, len(video), sent, resent, slides, max(0, frames - window), time.perf_counter() - began)
