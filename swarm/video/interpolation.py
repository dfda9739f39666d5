"""Make-A-Video-style frame interpolation with a text-to-video pipeline: known frames in, the missing ones generated.

Masked known-frame sampling: the video's latents are denoised as one clip, and at every step the known frames'
latents are replaced by their clean latents noised to that step's timestep (``scheduler.add_noise``, fresh seeded
noise each step), so the U-Net sees the known frames at the noise level of the rest and the missing frames are
generated to agree with them. After the last step the known frames are set to their clean latents, then decoded.

Built from the pipeline's own pieces (``encode_prompt``, ``prepare_latents``, ``prepare_extra_step_kwargs``, its
scheduler, ``decode_latents`` and ``video_processor``), so the same code runs a local U-Net and a ``RemoteUNet``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import TextToVideoSDPipeline
from diffusers.utils.torch_utils import randn_tensor

from swarm.client.pipeline import vae_latents


@dataclass
class InterpolationOutput:
    """``frames``: the whole video as ``output_type`` asks (``np``: (1, frames, height, width, 3) in [0, 1]);
    ``latents``: its final latents (1, channels, frames, h, w), the known frames' equal to their clean latents."""

    frames: Any
    latents: torch.Tensor


def interpolate_frames(pipe: TextToVideoSDPipeline, prompt: str, num_frames: int, *,
                       known_frames: Mapping[int, Any] | None = None,
                       known_latents: Mapping[int, torch.Tensor] | None = None,
                       height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                       guidance_scale: float = 9.0, negative_prompt: str | None = None, eta: float = 0.0,
                       generator: torch.Generator | None = None, output_type: str = "np") -> InterpolationOutput:
    """A ``num_frames`` video whose frames at the given indices are the known ones and whose others are generated.

    Give the known frames either as pixels (``known_frames``: index -> a PIL image, an (H, W, 3) array or a (3, H, W)
    tensor, values in [0, 1], as a pipeline outputs them; encoded with the mode of the VAE's latent distribution) or
    as latents (``known_latents``: index -> (channels, h, w), scaled as the pipeline's latents). ``height`` and
    ``width`` default to the known frames' size. Every input is checked (ValueError) before the U-Net runs once; a
    swarm U-Net's session is closed at the end.
    """
    known, height, width = _known_latents(pipe, num_frames, known_frames, known_latents, height, width)
    device = pipe._execution_device
    guided = guidance_scale > 1.0
    try:
        with torch.no_grad():
            prompt_embeds, negative_embeds = pipe.encode_prompt(prompt, device, 1, guided, negative_prompt)
            if guided:
                prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
            known = {index: latents.to(device=device, dtype=prompt_embeds.dtype) for index, latents in known.items()}
            indices = sorted(known)
            clean = torch.stack([known[index] for index in indices], dim=1).unsqueeze(0)  # (1, C, known, h, w)

            pipe.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, num_frames, height, width,
                                           prompt_embeds.dtype, device, generator)
            step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
            for t in pipe.scheduler.timesteps:
                noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=clean.dtype)
                # t as a 1-element batch: schedulers' add_noise index their tables with a list of timesteps
                latents[:, :, indices] = pipe.scheduler.add_noise(clean, noise, t.reshape(1))
                model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
                noise_pred = pipe.unet(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
                if guided:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (text - uncond)
                latents = _step(pipe.scheduler, noise_pred, t, latents, step_kwargs)
            latents[:, :, indices] = clean
            if output_type == "latent":
                return InterpolationOutput(frames=latents, latents=latents)
            video = pipe.video_processor.postprocess_video(video=pipe.decode_latents(latents), output_type=output_type)
            return InterpolationOutput(frames=video, latents=latents)
    finally:
        close_session = getattr(pipe.unet, "close_session", None)
        if close_session is not None:
            close_session()  # frees the servers' state of this generation at once


def _step(scheduler: Any, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
          step_kwargs: dict) -> torch.Tensor:
    """One scheduler step over every frame, frames folded into the batch as the text-to-video pipeline does."""
    batch, channels, frames, h, w = latents.shape

    def fold(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, h, w)

    previous = scheduler.step(fold(noise_pred), t, fold(latents), **step_kwargs).prev_sample
    return previous.reshape(batch, frames, channels, h, w).permute(0, 2, 1, 3, 4)


def _known_latents(pipe: TextToVideoSDPipeline, num_frames: int, known_frames: Mapping[int, Any] | None,
                   known_latents: Mapping[int, torch.Tensor] | None, height: int | None,
                   width: int | None) -> tuple[dict[int, torch.Tensor], int, int]:
    """The known frames' clean latents by index, and the video's pixel height and width; ValueError on bad input."""
    if not isinstance(pipe, TextToVideoSDPipeline):
        raise ValueError(f"frame interpolation needs a text-to-video pipeline (TextToVideoSDPipeline); got "
                         f"{type(pipe).__name__}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer; got {num_frames!r}")
    if (known_frames is None) == (known_latents is None):
        raise ValueError("give the known frames either as pixels (known_frames) or as latents (known_latents)")
    given = known_frames if known_frames is not None else known_latents
    if not given:
        raise ValueError("no known frames given: use the pipeline itself to generate a whole video")
    for index in given:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise ValueError(f"known frame indices must be integers; got {index!r}")
        if not 0 <= index < num_frames:
            raise ValueError(f"known frame index {index!r} is out of range for a video of {num_frames} frames")
    for name, size in (("height", height), ("width", width)):
        if size is not None and (size <= 0 or size % pipe.vae_scale_factor):
            raise ValueError(f"{name} must be a positive multiple of {pipe.vae_scale_factor}; got {size}")
    scale = pipe.vae_scale_factor
    if known_latents is not None:
        channels = pipe.unet.config.in_channels
        shapes = {tuple(latents.shape) for latents in known_latents.values()}
        first = next(iter(shapes))
        if len(shapes) > 1 or len(first) != 3 or first[0] != channels:
            raise ValueError(f"known latents must all have one shape ({channels}, h, w); got shapes {sorted(shapes)}")
        height, width = height or first[1] * scale, width or first[2] * scale
        if first[1:] != (height // scale, width // scale):
            raise ValueError(f"known latents of shape {first} do not fit {height}x{width} pixels: expected "
                             f"({channels}, {height // scale}, {width // scale})")
        return {int(index): latents for index, latents in known_latents.items()}, height, width
    indices = [int(index) for index in known_frames]
    pixels = pipe.video_processor.preprocess(list(known_frames.values()))  # (K, 3, H, W) in [-1, 1]
    height, width = height or pixels.shape[-2], width or pixels.shape[-1]
    if pixels.shape[-2:] != (height, width) or pixels.shape[-2] % scale or pixels.shape[-1] % scale:
        raise ValueError(f"known frames of {pixels.shape[-2]}x{pixels.shape[-1]} pixels do not fit a {height}x{width} "
                         f"video (sizes are multiples of {scale})")
    latents = vae_latents(pipe.vae, pixels)  # the mode: the known frames are given, not drawn
    return dict(zip(indices, latents, strict=True)), height, width
