"""The token transformer of long video: a Llama-family causal LM over text tokens and VQ codes.

A clip becomes one sequence ``[BOS, text (padded to a fixed length), BOV, frame 0's codes, frame 1's codes, ...]``,
where a frame is one time step of the VQ's code grid (``h * w`` codes, row-major). The layout travels in the
checkpoint's ``config.json`` (``video_layout``), so the model is a normal transformers checkpoint that
``python -m swarm.server`` serves like any LLM, and a client finds the layout in the config it loads.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

PAD, BOS, BOV = 0, 1, 2
SPECIAL_TOKENS = 3


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where text and codes sit in the vocabulary and in a sequence."""

    text_vocab: int  # words a description may use (mugen.VOCABULARY)
    codebook: int  # the VQ's codes
    text_length: int  # description words, padded with PAD
    frame_height: int  # one frame of codes: frame_height x frame_width
    frame_width: int
    frames: int  # frames of codes in a training sequence (the training length)

    @property
    def text_offset(self) -> int:
        return SPECIAL_TOKENS

    @property
    def code_offset(self) -> int:
        return SPECIAL_TOKENS + self.text_vocab

    @property
    def vocab_size(self) -> int:
        return self.code_offset + self.codebook

    @property
    def prefix_length(self) -> int:
        """BOS, the padded text and BOV: what every sequence starts with."""
        return self.text_length + 2

    @property
    def tokens_per_frame(self) -> int:
        return self.frame_height * self.frame_width

    @property
    def sequence_length(self) -> int:
        return self.prefix_length + self.frames * self.tokens_per_frame

    def prefix(self, text_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """The conditioning: ``[BOS, text..., PAD..., BOV]`` (text_ids are word indices)."""
        words = torch.as_tensor(text_ids, dtype=torch.long)
        if words.dim() != 1 or len(words) > self.text_length:
            raise ValueError(f"a description of at most {self.text_length} words is expected, got "
                             f"{tuple(words.shape)}")
        if len(words) and (int(words.min()) < 0 or int(words.max()) >= self.text_vocab):
            raise ValueError(f"word indices must lie in [0, {self.text_vocab})")
        padded = torch.full((self.text_length,), PAD, dtype=torch.long)
        padded[: len(words)] = words + self.text_offset
        return torch.cat([torch.tensor([BOS]), padded, torch.tensor([BOV])])

    def sequence(self, text_ids: torch.Tensor | list[int], codes: torch.Tensor) -> torch.Tensor:
        """One training sequence from a description and a (frames, h, w) grid of codes."""
        if codes.shape[1:] != (self.frame_height, self.frame_width):
            raise ValueError(f"codes of frames shaped ({self.frame_height}, {self.frame_width}) expected, got "
                             f"{tuple(codes.shape)}")
        return torch.cat([self.prefix(text_ids), codes.reshape(-1).long() + self.code_offset])

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Video tokens (whole frames) back to a (frames, h, w) grid of codes."""
        codes = tokens.long() - self.code_offset
        if codes.numel() % self.tokens_per_frame or (codes.numel() and (codes.min() < 0 or
                                                                         codes.max() >= self.codebook)):
            raise ValueError("not whole frames of video tokens")
        return codes.reshape(-1, self.frame_height, self.frame_width)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, config: PretrainedConfig) -> TokenLayout:
        """The layout a checkpoint was trained with (its config's ``video_layout``)."""
        layout = getattr(config, "video_layout", None)
        if not isinstance(layout, dict):
            raise ValueError("this checkpoint's config has no video_layout: it is not a video token transformer")
        return cls(**layout)


def transformer_config(layout: TokenLayout, hidden: int = 128, layers: int = 4, heads: int = 4,
                       context_frames: int | None = None) -> LlamaConfig:
    """A small Llama for ``layout``; positions for ``context_frames`` frames (default: the training length)."""
    frames = context_frames or layout.frames
    return LlamaConfig(vocab_size=layout.vocab_size, hidden_size=hidden, intermediate_size=hidden * 4,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=layout.prefix_length + frames * layout.tokens_per_frame,
                       bos_token_id=BOS, eos_token_id=None, pad_token_id=PAD, tie_word_embeddings=False,
                       video_layout=layout.to_dict())


def train_transformer(sequences: torch.Tensor, layout: TokenLayout, *, hidden: int = 128, layers: int = 4,
                      heads: int = 4, steps: int = 300, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
                      log: Callable[[str], None] | None = None) -> tuple[LlamaForCausalLM, dict]:
    """Train a causal LM on (N, sequence_length) token sequences, the loss on video tokens only (the description
    is given, never predicted). Deterministic for a seed. Returns the model in eval mode and
    ``{"loss_first", "loss_last", "steps", "seconds"}`` (losses averaged over the first and last 10% of steps)."""
    if sequences.dim() != 2 or sequences.shape[1] != layout.sequence_length:
        raise ValueError(f"sequences of {layout.sequence_length} tokens expected, got {tuple(sequences.shape)}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(transformer_config(layout, hidden, layers, heads))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # warm-up, then cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    began = time.perf_counter()
    for step in range(steps):
        batch = sequences[torch.randint(len(sequences), (min(batch_size, len(sequences)),), generator=generator)]
        labels = batch.clone()
        labels[:, : layout.prefix_length] = -100
        loss = model(input_ids=batch, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"transformer step {step}: loss {losses[-1]:.3f}")
    tenth = max(1, steps // 10)
    stats = {"loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth, "steps": steps,
             "seconds": time.perf_counter() - began}
    return model.eval(), stats
