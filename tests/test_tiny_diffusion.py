"""Smoke tests of the tiny diffusion models (swarm/hub/tiny_diffusion.py, tests/tiny_diffusion.py): the saved tiny
pipelines load with the real diffusers code and run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel, UNet3DConditionModel
from safetensors.torch import load_file
from tiny_diffusion import UNET_KINDS, sd15_unet_config, tiny_unet, tiny_unet_inputs
from transformers import CLIPTextModel, CLIPTokenizer

from swarm.hub.tiny_diffusion import (
    HIDDEN,
    TOKENS,
    VAE_SCALE,
    level_ranges,
    save_tiny_sd,
    save_tiny_sdxl,
    save_tiny_text_to_video,
    unet_levels,
    write_pipeline,
)

SAVERS = {"sd": save_tiny_sd, "sdxl": save_tiny_sdxl, "video": save_tiny_text_to_video}
PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "video": "TextToVideoSDPipeline"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-diffusion")
    return {name: save(root / name) for name, save in SAVERS.items()}


def _generate(pipe, size: int, seed: int = 0, **kwargs):
    out = pipe("a cat", num_inference_steps=2, height=size, width=size, generator=torch.Generator().manual_seed(seed),
               **kwargs)
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("name", SAVERS)
def test_pipeline_loads_and_generates(saved, name):
    pipe = DiffusionPipeline.from_pretrained(saved[name])
    assert type(pipe).__name__ == PIPELINES[name]
    pipe.set_progress_bar_config(disable=True)
    extra = {"num_frames": 2} if name == "video" else {}
    first = np.asarray(_generate(pipe, 64, output_type="np", **extra))
    again = np.asarray(_generate(pipe, 64, output_type="np", **extra))
    other = np.asarray(_generate(pipe, 64, seed=1, output_type="np", **extra))
    assert first.shape == ((1, 2, 64, 64, 3) if name == "video" else (1, 64, 64, 3))
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", SAVERS)
def test_odd_latent_size(saved, name):
    """120 px passes the pipelines' height % 8 check and gives 15x15 latents (odd: the U-Net forwards upsample_size)."""
    pipe = DiffusionPipeline.from_pretrained(saved[name])
    pipe.set_progress_bar_config(disable=True)
    extra = {"num_frames": 2} if name == "video" else {}
    size = 15 * VAE_SCALE
    latents = _generate(pipe, size, output_type="latent", **extra)
    assert latents.shape == ((1, 4, 2, 15, 15) if name == "video" else (1, 4, 15, 15))
    if name == "sd":  # the VAE decodes 15x15 latents to 120x120 pixels
        pixels = np.asarray(_generate(pipe, size, output_type="np"))
        assert pixels.shape == (1, size, size, 3) and np.isfinite(pixels).all()


def test_components_load_individually(saved):
    unet = UNet2DConditionModel.from_pretrained(saved["sd"] / "unet")
    assert unet.config.cross_attention_dim == HIDDEN
    assert UNet3DConditionModel.from_pretrained(saved["video"] / "unet").config.cross_attention_dim == HIDDEN
    tokenizer = CLIPTokenizer.from_pretrained(saved["sd"] / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(saved["sd"] / "text_encoder")
    ids = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    assert ids.shape == (1, TOKENS) and tokenizer.model_max_length == encoder.config.max_position_embeddings
    assert len(tokenizer) <= encoder.config.vocab_size
    assert encoder(ids).last_hidden_state.shape == (1, TOKENS, HIDDEN)


def test_saving_is_deterministic(tmp_path):
    first = load_file(save_tiny_sd(tmp_path / "a") / "unet" / "diffusion_pytorch_model.safetensors")
    again = load_file(save_tiny_sd(tmp_path / "b") / "unet" / "diffusion_pytorch_model.safetensors")
    other = load_file(save_tiny_sd(tmp_path / "c", seed=1) / "unet" / "diffusion_pytorch_model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("kind", UNET_KINDS)
def test_tiny_unet_runs(kind):
    model = tiny_unet(kind)
    for batch, frames, size in ((1, 4, 16), (2, 3, 15)):
        args, kwargs = tiny_unet_inputs(kind, batch=batch, frames=frames, size=size)
        with torch.no_grad():
            out = model(*args, **kwargs).sample
        expected = list(args[0].shape)
        expected[2 if kind == "svd" else 1] = 4  # svd: (B, F, 8, H, W) in, (B, F, 4, H, W) out
        assert list(out.shape) == expected and torch.isfinite(out).all()
    same = tiny_unet(kind)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True))


def test_sd15_config_size():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_levels_and_server_ranges(saved, tmp_path):
    """--blocks ranges come from the saved U-Net's levels: SD 1.5's 5 levels split 0:2, 2:5 (the README's ranges for
    it), the tiny pipelines' 3 levels 0:1, 1:3."""
    assert {name: unet_levels(path) for name, path in saved.items()} == {"sd": 3, "sdxl": 3, "video": 3}
    assert level_ranges(3, 2) == [(0, 1), (1, 3)]
    with torch.device("meta"):
        UNet2DConditionModel(**sd15_unet_config()).save_config(tmp_path / "sd15-unet")
    assert unet_levels(tmp_path / "sd15-unet") == 5
    assert level_ranges(5, 2) == [(0, 2), (2, 5)]
    assert level_ranges(5, 3) == [(0, 1), (1, 3), (3, 5)]
    assert level_ranges(3, 9) == [(0, 1), (1, 2), (2, 3)]  # never more servers than levels


def test_quick_start_keeps_what_is_there(saved, tmp_path):
    """The quick start writes into a new or empty directory; one holding a pipeline of the asked class is used as it
    is (the commands are printed for it), anything else is refused."""
    assert not write_pipeline(saved["sd"], "sd")
    with pytest.raises(FileExistsError, match="not empty"):
        write_pipeline(saved["sd"], "video")
    (tmp_path / "empty").mkdir()
    assert write_pipeline(tmp_path / "empty", "sd")
    assert DiffusionPipeline.load_config(tmp_path / "empty")["_class_name"] == "StableDiffusionPipeline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # the staging directory was renamed into place
