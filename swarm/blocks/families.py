"""Where each decoder-only model family keeps its parts.

A family is a handful of attribute paths inside the family's ``*ForCausalLM`` class: the list of decoder layers
(served remotely), and the parts the client keeps (token embeddings, optional learned positions, final norm,
LM head). Adding a family whose layers follow one of these layouts is one line in ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class BlockFamily:
    layers: str = "model.layers"  # nn.ModuleList of decoder layers: the blocks servers hold
    embed_tokens: str = "model.embed_tokens"  # token embeddings (client)
    norm: str = "model.norm"  # final norm applied after the last block (client)
    lm_head: str = "lm_head"  # output projection (client)
    rotary: str | None = "model.rotary_emb"  # rotary embedding module, recomputed on servers from positions
    position_embeddings: str | None = None  # learned absolute positions added to token embeddings (client)

    @property
    def base_prefix(self) -> str:
        """Prefix of the base model inside ``*ForCausalLM`` ("model" / "transformer"); checkpoints saved from
        the base model alone lack it."""
        return self.layers.split(".")[0]


LLAMA_LIKE = BlockFamily()
GPT2_LIKE = BlockFamily(
    layers="transformer.h",
    embed_tokens="transformer.wte",
    norm="transformer.ln_f",
    rotary=None,
    position_embeddings="transformer.wpe",
)

FAMILIES: dict[str, BlockFamily] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gpt2": GPT2_LIKE,
}


def family_for(config: PretrainedConfig) -> BlockFamily:
    try:
        return FAMILIES[config.model_type]
    except KeyError:
        raise NotImplementedError(
            f"model type {config.model_type!r} is not supported yet; supported: {sorted(FAMILIES)}"
        ) from None
