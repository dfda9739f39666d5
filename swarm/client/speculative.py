"""Speculative greedy decoding through an inference session: a cheap proposer drafts tokens, the swarm checks them
all in one step, the session is rewound past the first wrong one.

Each step feeds the newest token and ``k`` drafted ones (one step's round trips for up to ``k + 1`` tokens); the
model's greedy choice at every fed position says how many drafts were right. The servers' caches are rewound to
the accepted prefix (the next step overwrites the rest), so the output is the plain greedy output.

Proposers: ``PromptLookup`` (drafts copied from where the text's last n-gram occurred before: free, and strong on
input-grounded tasks such as quoting or rewriting) and ``DraftModel`` (a small local causal LM with the same
tokenizer, its own KV cache cut back to what was accepted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from swarm.blocks import compat

if TYPE_CHECKING:
    from swarm.client.model import DistributedModelForCausalLM

# generate() keywords the speculative loop understands; anything else (sampling, beams, penalties) would make its
# output differ from what the caller asked for, so it is refused rather than ignored.
SUPPORTED = {"max_new_tokens", "max_length", "eos_token_id", "pad_token_id", "attention_mask", "do_sample",
             "num_beams", "generation_config", "use_cache", "input_ids"}
# generation_config fields whose non-neutral values change greedy choices
CHANGES_GREEDY = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                  "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "min_new_tokens",
                  "min_length", "sequence_bias", "encoder_repetition_penalty")


class Proposer(Protocol):
    def __call__(self, ids: torch.Tensor, count: int) -> torch.Tensor:
        """Up to ``count`` tokens likely to follow ``ids`` (a 1-D tensor); may be empty."""


@dataclass
class PromptLookup:
    """Drafts from the text itself: the tokens that followed the earliest earlier occurrence of its last n-gram
    (n from ``max_ngram`` down to ``min_ngram``)."""

    max_ngram: int = 3
    min_ngram: int = 1

    def __call__(self, ids: torch.Tensor, count: int) -> torch.Tensor:
        tokens = ids.tolist()
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(tokens) <= n:
                continue
            tail = tokens[-n:]
            for start in range(len(tokens) - n):
                if tokens[start:start + n] == tail:
                    return torch.tensor(tokens[start + n:start + n + count], dtype=ids.dtype)
        return ids[:0]


class DraftModel:
    """Drafts from a small local causal LM (same tokenizer), greedily, with a KV cache kept across steps and cut
    back to the longest prefix it shares with the accepted text."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.cache: DynamicCache | None = None
        self.tokens = torch.zeros(0, dtype=torch.long)  # what the cache holds

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, count: int) -> torch.Tensor:
        if count <= 0:
            return ids[:0]
        known = self.tokens[: len(ids) - 1]  # at least the newest token is fed again
        same = (known == ids[: len(known)]).long().cumprod(0)
        common = int(same.sum())
        if self.cache is None or common == 0:
            self.cache, common = DynamicCache(config=self.model.config), 0
        else:
            compat.truncate_cache(self.cache, common)
        self.tokens, feed, drafts = ids[:common], ids[common:], []
        for _ in range(count):
            logits = self.model(input_ids=feed[None], cache=self.cache, use_cache=True).logits
            self.tokens = torch.cat([self.tokens, feed])
            feed = logits[0, -1].argmax().reshape(1)
            drafts.append(feed)
        return torch.cat(drafts)

    def reset(self) -> None:
        self.cache, self.tokens = None, torch.zeros(0, dtype=torch.long)


@dataclass
class SpeculationStats:
    """How one speculative generation went: steps through the swarm, drafts sent and accepted."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    per_step: list[int] = field(default_factory=list)  # tokens gained per step

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_greedy(model: DistributedModelForCausalLM, input_ids: torch.Tensor, kwargs: dict) -> None:
    """Refuse what speculation cannot reproduce exactly: sampling, beams, logits processors, batches."""
    unsupported = sorted(set(kwargs) - SUPPORTED)
    config = kwargs.get("generation_config") or model.generation_config
    if kwargs.get("do_sample", config.do_sample) or kwargs.get("num_beams", config.num_beams or 1) != 1:
        unsupported.append("do_sample/num_beams (speculation here is greedy)")
    for name in CHANGES_GREEDY:
        value = getattr(config, name, None)
        if value not in (None, 0, 1.0, [], {}):
            unsupported.append(f"generation_config.{name}={value}")
    if unsupported:
        raise ValueError(f"speculative generation is greedy decoding only; not supported with it: "
                         f"{', '.join(unsupported)}")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("speculative generation takes one sequence of token ids (batch size 1), as in transformers")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("speculative generation takes an unpadded sequence (an attention_mask of ones)")


@torch.no_grad()
def generate_speculatively(model: DistributedModelForCausalLM, input_ids: torch.Tensor, propose: Proposer,
                           draft_tokens: int, max_new_tokens: int,
                           eos_token_id: int | list[int] | None = None) -> tuple[torch.Tensor, SpeculationStats]:
    """Greedy continuation of ``input_ids`` (batch 1) by up to ``max_new_tokens`` tokens, checking up to
    ``draft_tokens`` proposed tokens per step, in the model's active inference session."""
    session = model.get_remote().active_session
    stats = SpeculationStats()
    eos = set() if eos_token_id is None else set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    start = model._sync_session(session, input_ids)  # a session's history is reused, rewound where it differs
    logits = model(input_ids=input_ids[:, start:]).logits
    out = torch.cat([input_ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    generated = 1
    while generated < max_new_tokens and int(out[0, -1]) not in eos:
        count = min(draft_tokens, max_new_tokens - generated - 1)
        drafts = propose(out[0], count)[:count].to(out.dtype) if count > 0 else out[0, :0]
        fed_before = session.position
        logits = model(input_ids=torch.cat([out[:, -1:], drafts[None]], dim=1)).logits
        chosen = logits[0].argmax(-1)  # chosen[i]: the model's token after the newest + i drafts
        matches = (chosen[: len(drafts)] == drafts).long().cumprod(0)
        accepted = int(matches.sum())
        session.rewind(fed_before + 1 + accepted)  # the newest token and the accepted drafts stay cached
        new = torch.cat([drafts[:accepted], chosen[accepted:accepted + 1]])
        for index, token in enumerate(new.tolist()):
            if token in eos:
                new = new[: index + 1]
                break
        new = new[: max_new_tokens - generated]
        out = torch.cat([out, new[None]], dim=1)
        generated += len(new)
        stats.steps += 1
        stats.drafted += len(drafts)
        stats.accepted += accepted
        stats.per_step.append(len(new))
    stats.new_tokens = generated
    session.output_ids = out
    return out, stats
