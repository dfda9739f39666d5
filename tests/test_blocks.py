"""Block spans without the network: partial loading, equivalence with the local model, cache rewinds."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import FAMILIES, VOCAB
from transformers import AutoModelForCausalLM, GPT2Config

from swarm.blocks import compat
from swarm.blocks.families import family_for
from swarm.blocks.span import BlockSpan


def _local_hidden(local, ids: torch.Tensor, layers: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Input of the first and output of the last layer in ``layers``, from the local model."""
    with torch.no_grad():
        states = local(ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0, ..., final norm]
    return states[layers.start], states[layers.stop]


@pytest.mark.parametrize("family", FAMILIES)
def test_span_loads_only_its_shards(tiny_model, family):
    path = tiny_model(family)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    span = BlockSpan.from_pretrained(str(path), 2, 4)
    layers = family_for(span.config).layers
    needed = {file for name, file in index.items() if name.startswith((f"{layers}.2.", f"{layers}.3."))}
    assert set(span.opened_files) == needed
    assert len(needed) < len(set(index.values())) / 2  # the embeddings and other layers were never opened


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_span_forward_equals_local_layers(tiny_model, family):
    path = tiny_model(family)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    span = BlockSpan.from_pretrained(str(path), 1, 4)
    inputs, expected = _local_hidden(local, ids, range(1, 4))
    with torch.no_grad():
        out = span(inputs, torch.arange(9).expand(2, 9))
    assert torch.allclose(out, expected, atol=1e-5)


def test_sub_range_of_a_span_with_cache_and_rewind(tiny_model):
    path = tiny_model("qwen2")  # hybrid cache: layers 3.. use a sliding window
    span = BlockSpan.from_pretrained(str(path), 0, 6)
    torch.manual_seed(0)
    hidden = torch.randn(1, 12, span.hidden_size)
    positions = torch.arange(12)[None]
    with torch.no_grad():
        full = span(hidden, positions, first=2, last=6)  # no cache: the reference
        cache = span.new_cache()
        first_part = span(hidden[:, :8], positions[:, :8], cache=cache, first=2, last=6)
        wrong = span(torch.randn(1, 2, span.hidden_size), positions[:, 8:10], cache=cache, first=2, last=6)
        compat.truncate_cache(cache, 8)  # rewind the two wrong positions
        second_part = span(hidden[:, 8:], positions[:, 8:], cache=cache, first=2, last=6)
    assert not torch.allclose(wrong, full[:, 8:10], atol=1e-3)
    # values reach ~30 here: a cached and a full pass differ by float noise of up to ~1.5e-5 on some CPUs (AMD EPYC,
    # matmuls of other shapes), where a rewind gone wrong differs by O(1)
    assert torch.allclose(torch.cat([first_part, second_part], 1), full, atol=1e-4)
    assert compat.cache_layer_lengths(cache)[:2] == [0, 0]  # layers outside the sub-range stay empty


def test_bad_block_range_and_unknown_family_are_clear(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="outside the model's 0:6"):
        BlockSpan.from_pretrained(str(tiny_model("llama")), 4, 9)
    config = GPT2Config(n_layer=2)
    config.model_type = "mamba"
    with pytest.raises(NotImplementedError, match="model type 'mamba' is not supported"):
        family_for(config)
