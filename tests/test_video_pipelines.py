"""Video workloads built on diffusers pipelines, U-Net on real in-process servers, compared with the same code run
locally: Make-A-Video-style frame interpolation (swarm/video/interpolation.py) and I2VGenXL with working defaults
(swarm/client/pipeline.py). Each test's fixtures start servers of their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, I2VGenXLPipeline
from PIL import Image

from swarm import AutoDistributedPipeline
from swarm.client.pipeline import I2VGenXLDefaultsPipeline, i2vgenxl_pipeline
from swarm.hub.tiny_diffusion import save_tiny_i2vgenxl, save_tiny_text_to_video
from swarm.video.interpolation import interpolate_frames


def _served(launcher, path) -> tuple[list, list[str]]:
    """Two in-process servers splitting the U-Net's 3 levels (0:1 and 1:3, the mid block on the second)."""
    servers = launcher.start_halves(path, in_process=True)
    return servers, [servers[0].maddr]


# ------------------------------------------------------------------------------------------ frame interpolation


@pytest.fixture(scope="module")
def interpolation_swarm(launcher, models_dir):
    path = models_dir / "interpolation-text-to-video"
    if not path.exists():
        save_tiny_text_to_video(path)
    servers, peers = _served(launcher, path)
    local = DiffusionPipeline.from_pretrained(path)
    remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=peers, compression="none")
    yield {"servers": servers, "local": local, "remote": remote}
    remote.unet.shutdown()


def _known(seed: int) -> dict[int, torch.Tensor]:
    """Latents of frames 0 and 3 of a 4-frame 64 px video (8x8 latents)."""
    generator = torch.Generator().manual_seed(seed)
    return {0: torch.randn(4, 8, 8, generator=generator), 3: torch.randn(4, 8, 8, generator=generator)}


def _interpolate(pipe, known: dict[int, torch.Tensor], seed: int = 0, **more):
    return interpolate_frames(pipe, "a ball rolls", 4, known_latents=known, num_inference_steps=3,
                              generator=torch.Generator().manual_seed(seed), **more)


def test_interpolation_through_the_swarm_equals_local(interpolation_swarm):
    """The same function with the same seed gives the same video with a swarm U-Net as with the local one; the
    known frames end as their given latents, the missing ones follow them, and the call closes its session."""
    remote, local, known = interpolation_swarm["remote"], interpolation_swarm["local"], _known(1)
    out, ref = _interpolate(remote, known), _interpolate(local, known)
    assert out.frames.shape == ref.frames.shape == (1, 4, 64, 64, 3)
    assert np.abs(out.frames - ref.frames).max() == 0 and torch.equal(out.latents, ref.latents)
    assert remote.unet.session is None  # closed at the end: the servers hold nothing of it
    for index, latents in known.items():
        assert torch.equal(out.latents[0, :, index], latents)
    # The missing frames are generated with the known ones in view: other known frames, same seed, other frames.
    other = _interpolate(local, _known(2))
    assert not torch.allclose(other.latents[0, :, 1:3], ref.latents[0, :, 1:3], atol=1e-3)


def test_known_pixel_frames_are_encoded_with_the_vae_mode(interpolation_swarm):
    """Pixel frames (as a pipeline outputs them) become their VAE latents' mode, kept exactly in the result."""
    local = interpolation_swarm["local"]
    frames = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    out = interpolate_frames(local, "a ball rolls", 3, known_frames={0: frames[0], 2: frames[1]},
                             num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        expected = local.vae.encode(pixels).latent_dist.mode() * local.vae.config.scaling_factor
    assert out.frames.shape == (1, 3, 64, 64, 3)
    assert torch.equal(out.latents[0, :, 0], expected[0]) and torch.equal(out.latents[0, :, 2], expected[1])


def test_bad_interpolation_inputs_fail_before_any_remote_call(interpolation_swarm):
    remote, servers = interpolation_swarm["remote"], interpolation_swarm["servers"]
    before = [server.server.rpc_info()["served"] for server in servers]
    known = _known(1)
    cases = [
        (dict(known_latents={4: known[0]}), "index 4 is out of range for a video of 4 frames"),
        (dict(known_latents={-1: known[0]}), "index -1 is out of range"),
        (dict(known_latents={1.0: known[0]}), "indices must be integers; got 1.0"),
        (dict(known_latents={0: torch.randn(4, 8, 9)}, height=64, width=64), r"\(4, 8, 9\) do not fit 64x64"),
        (dict(known_latents={0: torch.randn(3, 8, 8)}), r"one shape \(4, h, w\)"),
        (dict(known_latents={0: known[0], 3: torch.randn(4, 16, 16)}), "one shape"),
        (dict(), "either as pixels"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            interpolate_frames(remote, "a ball rolls", 4, num_inference_steps=2, **kwargs)
    assert remote.unet.session is None
    assert [server.server.rpc_info()["served"] for server in servers] == before  # no server was asked anything


# --------------------------------------------------------------------------------------------------- I2VGenXL


@pytest.fixture(scope="module")
def i2vgenxl_swarm(launcher, models_dir):
    path = models_dir / "tiny-i2vgenxl-pipeline"
    if not path.exists():
        save_tiny_i2vgenxl(path)
    _, peers = _served(launcher, path)
    local = i2vgenxl_pipeline(DiffusionPipeline.from_pretrained(path))
    remote = AutoDistributedPipeline.from_pretrained(path, initial_peers=peers, compression="none")
    yield {"local": local, "remote": remote}
    remote.unet.shutdown()


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8))


def _image_to_video(pipe, seed: int = 0) -> np.ndarray:
    """The call a user would make: no clip_skip, a seeded generator, nothing else set by hand."""
    return pipe(prompt="a ball rolls", image=_image(), height=64, width=64, num_frames=3, num_inference_steps=2,
                generator=torch.Generator().manual_seed(seed), output_type="np").frames


def test_i2vgenxl_through_the_swarm_equals_local_and_is_reproducible(i2vgenxl_swarm):
    remote, local = i2vgenxl_swarm["remote"], i2vgenxl_swarm["local"]
    assert isinstance(remote, I2VGenXLDefaultsPipeline)
    out = _image_to_video(remote)
    assert out.shape == (1, 3, 64, 64, 3)
    assert np.abs(out - _image_to_video(local)).max() == 0
    assert remote.unet.session is None
    torch.manual_seed(123)  # the global RNG's state must not matter: only the generator does
    assert (_image_to_video(remote) == out).all()
    assert not (_image_to_video(remote, seed=1) == out).all()


def test_i2vgenxl_defaults_keep_its_penultimate_layer_text_states_and_position_mask(i2vgenxl_swarm):
    """The fix changes nothing else: clip_skip=1 (the default) gives the text encoder's penultimate hidden states
    through its final layer norm, as diffusers computes them where its clip-skip path works; the image latents'
    position-mask frames equal diffusers'; the first frame is the mode of the VAE's latents."""
    pipe = i2vgenxl_swarm["local"]
    encoder = pipe.text_encoder
    ids = pipe.tokenizer("a ball rolls", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    pipe._guidance_scale = 9.0  # as __call__ sets it: classifier-free guidance doubles the batch
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = encoder.final_layer_norm(encoder(ids, output_hidden_states=True).hidden_states[-2])
        embeds, _ = pipe.encode_prompt("a ball rolls", "cpu", 1, clip_skip=1)
        last_layer, _ = pipe.encode_prompt("a ball rolls", "cpu", 1, clip_skip=None)
        latents = pipe.prepare_image_latents(pixels, "cpu", 4, 1)
        reference = I2VGenXLPipeline.prepare_image_latents(pipe, pixels, "cpu", 4, 1)
        mode = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    assert len(encoder.encoder.layers) == encoder.config.num_hidden_layers  # restored after the call
    assert torch.equal(embeds, expected) and not torch.allclose(embeds, last_layer)
    assert latents.shape == reference.shape == (2, 4, 4, 8, 8)
    assert torch.equal(latents[:, :, 1:], reference[:, :, 1:])
    assert torch.equal(latents[:, :, 0], mode.repeat(2, 1, 1, 1))
