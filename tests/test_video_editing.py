"""AnyV2V-style video editing through real servers: DDIM inversion capturing features on the servers, then I2V
generation from the inverted noise with those features injected, equal to the same algorithm run locally."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_diffusion import as_served

from swarm import AutoDistributedPipeline
from swarm.client.pipeline import i2vgenxl_pipeline
from swarm.hub.tiny_diffusion import save_tiny_i2vgenxl
from swarm.video.anyv2v import anyv2v, feature_bytes, injection_places

FRAMES, SIZE = 3, 64


@pytest.fixture(scope="module")
def i2v(launcher, models_dir):
    path = save_tiny_i2vgenxl(models_dir / "tiny-i2vgenxl-editing")
    # features of every frame at every injected step take more than a plain generation: more session memory
    first, _ = launcher.start_halves(path, "--max-diffusion-sessions", "64", in_process=True)
    local = i2vgenxl_pipeline(DiffusionPipeline.from_pretrained(path))
    as_served(local.unet)
    remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=[first.maddr], compression="none")
    yield {"local": local, "remote": remote}
    remote.unet.shutdown()


def _source() -> torch.Tensor:
    return torch.rand(FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def _edit(frame: torch.Tensor) -> torch.Tensor:
    return 1 - frame  # any image function; an img2img pipeline through the swarm in examples/video_editing.py


def test_anyv2v_through_the_swarm_equals_local(i2v):
    """The edited video equals the local run exactly (inversion, injection, generation); injecting the source's
    features changes it (the same edit without injection differs); the servers end with no session or features."""
    local, remote = i2v["local"], i2v["remote"]

    def run(pipe, **options):  # every kind of place injected in the first of 2 steps
        options = {"conv_injection": 0.5, "spatial_attention_injection": 0.5, **options}
        return anyv2v(pipe, _source(), _edit, "a tiny edit", num_inference_steps=2, **options)

    expected = run(local)
    out = run(remote)
    assert torch.equal(out.inverted, expected.inverted)
    assert torch.equal(out.latents, expected.latents) and torch.equal(out.frames, expected.frames)
    assert out.frames.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert torch.equal(out.edited_first_frame, _edit(_source()[:1]))
    plain = run(remote, conv_injection=0.0, spatial_attention_injection=0.0, temporal_attention_injection=0.0)
    assert torch.equal(plain.inverted, expected.inverted)
    assert not torch.allclose(plain.latents, expected.latents, atol=1e-4)
    assert remote.unet.session is None and remote.unet.feature_bytes == 0


def test_anyv2v_places_and_their_bytes(i2v):
    unet = i2v["local"].unet
    conv, attention = injection_places(unet)
    assert conv and all(p.startswith("up_blocks.1.resnets.") for p in conv)
    assert any(".temp_attentions." in p for p in attention) and any(".attentions." in p for p in attention)
    assert injection_places(i2v["remote"].unet) == (conv, attention)
    # the bound holds what one capture really takes
    from swarm.blocks.unet_modifiers import LocalFeatureBank

    bank = LocalFeatureBank(unet, 2**30)
    latents = torch.randn(1, 4, FRAMES, SIZE // 8, SIZE // 8)
    condition = {"encoder_hidden_states": torch.randn(1, 77, 32), "fps": torch.tensor([8]),
                 "image_latents": torch.randn(1, 4, FRAMES, SIZE // 8, SIZE // 8),
                 "image_embeddings": torch.randn(1, 1, 32)}
    with torch.no_grad(), bank.capture("t", conv + attention):
        unet(latents, 500, **condition)
    bound = feature_bytes(unet, conv + attention, FRAMES, SIZE // 8, SIZE // 8, 1)
    assert 0 < bank.bytes <= sum(bound.values())
    # each server reserves for its own levels' places: level 0 holds up block 1 (all of them here: up block 0 has
    # neither attention nor injected ResNets), levels 1-2 up block 0 and the mid block
    from swarm.blocks.unet_modifiers import budget_for

    assert all(place.startswith("up_blocks.1.") for place in bound)
    assert budget_for(bound, 0, 1, 3) == sum(bound.values()) and budget_for(bound, 1, 3, 3) == 0
    assert budget_for({"up_blocks.0.resnets.0": 5, "mid_block.resnets.0": 7, "down_blocks.0.resnets.1": 11},
                      1, 3, 3) == 12


def test_anyv2v_bad_inputs_are_clear(i2v):
    remote = i2v["remote"]
    with pytest.raises(ValueError, match="source must be"):
        anyv2v(remote, torch.rand(3, SIZE, SIZE), _edit, "x")
    with pytest.raises(ValueError, match="edited first frame"):
        anyv2v(remote, _source(), lambda frame: frame[:, :2], "x")
    with pytest.raises(ValueError, match="shares of the steps"):
        anyv2v(remote, _source(), _edit, "x", temporal_attention_injection=2.0)
