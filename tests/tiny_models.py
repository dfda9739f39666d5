"""Tiny random-weight models of each supported family, saved as sharded safetensors like a hub checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(family: str) -> PretrainedConfig:
    # llama30: as many blocks as SmolLM2, for routing and failover tests; llama2: for tests of the protocol alone
    if family in ("llama", "llama30", "llama2"):
        layers = {"llama30": 30, "llama2": 2}.get(family, 6)
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **COMMON)
    if family == "llama16":  # hidden 16, 2 blocks: small enough for zero-knowledge circuits in tests
        return LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, **COMMON)
    if family == "qwen2":
        # max_window_layers < num_hidden_layers: the top layers use sliding-window attention (a hybrid cache)
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=True,
                           sliding_window=16, max_window_layers=3, tie_word_embeddings=True, **COMMON)
    if family == "mistral":
        return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                             num_key_value_heads=1, max_position_embeddings=512, sliding_window=None,
                             tie_word_embeddings=False, **COMMON)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=6, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **COMMON)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    """Build a tiny random model and save it with small shards (so partial loading is exercised)."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger random weights so tokens differ across positions and greedy isn't constant
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="60KB")
    return directory


def save_tiny_chat_model(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama with the embedded SmolLM2 tokenizer (vocabulary and chat template), for the API gateway
    and the terminal chat: text in, text out. Random weights write gibberish; tests compare against ``generate``."""
    from transformers import GenerationConfig

    from swarm import load_tokenizer

    tokenizer = load_tokenizer()  # the embedded default model's (callers depend on the embedded_model fixture)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, **special)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # as in save_tiny_model: large enough that greedy tokens vary along the sequence
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
    model.generation_config = GenerationConfig(**special)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="200KB")
    tokenizer.save_pretrained(directory)
    return directory
