"""ConsistI2V-style image-to-video with a text-to-video pipeline (local, or its U-Net served by the swarm).

Three parts of ConsistI2V (Ren et al., 2024) that need no retraining, applied to a text-to-video U-Net:

* **first-frame conditioning**: the first frame's latent is the given image's, noised to each step's level
  (and clean at the end), so the video starts from the image;
* **first-frame attention**: every spatial self-attention layer also attends to the first frame of its video
  (``swarm.blocks.unet_modifiers.FirstFrameAttnProcessor``: on the servers for a ``RemoteUNet``), which carries its
  appearance to the other frames, and every temporal one to the first frame's 3x3 neighbourhood of each position
  (``FirstFrameTemporalAttnProcessor``);
* **FrameInit**: the initial noise takes its low spatio-temporal frequencies from the image repeated as a static
  video, noised to the first step, and its high frequencies from random noise: layout from the image, detail free.

The same function runs a local pipeline and a distributed one, so the two give the same video for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from swarm.blocks.unet_modifiers import first_frame_processors
from swarm.client.pipeline import vae_latents


@dataclass
class VideoOutput:
    frames: object  # as ``output_type`` asks (``pt``: (batch, frames, channels, height, width) in [0, 1])
    latents: torch.Tensor  # (batch, channels, frames, height, width), before decoding


def low_pass_mask(shape: tuple[int, int, int], cutoff: float, temporal_cutoff: float | None = None) -> torch.Tensor:
    """A Gaussian low-pass filter over (frames, height, width) frequencies, for ``torch.fft.fftn`` of those dims:
    1 at frequency 0, exp(-1/2) at ``cutoff`` (spatial) / ``temporal_cutoff`` (in cycles per sample, up to 0.5)."""
    temporal_cutoff = cutoff if temporal_cutoff is None else temporal_cutoff
    if not 0 < cutoff <= 0.5 or not 0 < temporal_cutoff <= 0.5:
        raise ValueError("cutoffs are frequencies in (0, 0.5] cycles per sample")
    frames, height, width = (torch.fft.fftfreq(n) for n in shape)
    distance = (frames[:, None, None] / temporal_cutoff) ** 2 + (height[None, :, None] / cutoff) ** 2 + \
        (width[None, None, :] / cutoff) ** 2
    return torch.exp(-distance / 2)


def frame_init(static: torch.Tensor, noise: torch.Tensor, scheduler, timestep: torch.Tensor,
               cutoff: float = 0.25) -> torch.Tensor:
    """FrameInit: the low frequencies of ``static`` (a video of one frame repeated) noised to ``timestep``, the high
    frequencies of ``noise``. Tensors (batch, channels, frames, height, width)."""
    noised = scheduler.add_noise(static, noise, timestep.reshape(1))
    mask = low_pass_mask(tuple(static.shape[2:]), cutoff).to(static.device)
    dims = (-3, -2, -1)
    low = torch.fft.fftn(noised.float(), dim=dims) * mask
    high = torch.fft.fftn(noise.float(), dim=dims) * (1 - mask)
    return torch.fft.ifftn(low + high, dim=dims).real.to(static.dtype)


def encode_image(pipe: DiffusionPipeline, image: torch.Tensor) -> torch.Tensor:
    """The image's latent (the mode of the VAE's distribution: no sampling, so no seed to share)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError("image must be a (1, 3, height, width) tensor in [-1, 1]")
    factor = pipe.vae_scale_factor
    if image.shape[2] % factor or image.shape[3] % factor:
        raise ValueError(f"image height and width must be multiples of {factor}")
    return vae_latents(pipe.vae, image)


@torch.no_grad()
def consisti2v(pipe: DiffusionPipeline, image: torch.Tensor, prompt: str, num_frames: int = 16,
               num_inference_steps: int = 25, guidance_scale: float = 7.5, negative_prompt: str | None = None,
               generator: torch.Generator | None = None, frame_init_cutoff: float | None = 0.25,
               first_frame_attention: bool = True, temporal_window: int | None = 3,
               output_type: str = "pt") -> VideoOutput:
    """A video of ``num_frames`` frames starting from ``image`` ((1, 3, H, W) in [-1, 1]) with a text-to-video
    pipeline (diffusers' ``TextToVideoSDPipeline``, local or from ``AutoDistributedPipeline``).
    ``frame_init_cutoff=None`` starts from plain noise; ``first_frame_attention=False`` keeps the U-Net's own;
    ``temporal_window=None`` leaves the temporal layers' attention as it is."""
    if not isinstance(num_frames, int) or num_frames < 2:
        raise ValueError("num_frames must be an integer >= 2 (the first frame is the image)")
    first = encode_image(pipe, image)  # (1, channels, h, w)
    unet, scheduler = pipe.unet, pipe.scheduler
    guided = guidance_scale > 1.0
    text, negative = pipe.encode_prompt(prompt, first.device, 1, guided, negative_prompt)
    embeddings = torch.cat([negative, text]) if guided else text
    scheduler.set_timesteps(num_inference_steps, device=first.device)
    timesteps = scheduler.timesteps
    shape = (1, first.shape[1], num_frames, *first.shape[2:])
    noise = torch.randn(shape, generator=generator, dtype=first.dtype)
    static = first[:, :, None].expand(shape)
    if frame_init_cutoff is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = frame_init(static, noise, scheduler, timesteps[0], frame_init_cutoff)
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    previous = dict(unet.attn_processors) if first_frame_attention else None
    if first_frame_attention:
        unet.set_attn_processor(first_frame_processors(unet, num_frames, temporal_window))
    try:
        for t in timesteps:
            # the first frame is the image, at this step's noise level
            latents[:, :, 0] = scheduler.add_noise(first, noise[:, :, 0], t.reshape(1))
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            prediction = unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
            if guided:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            folded = latents.permute(0, 2, 1, 3, 4).reshape(num_frames, *latents.shape[1:2], *latents.shape[3:])
            step = scheduler.step(prediction.permute(0, 2, 1, 3, 4).reshape(folded.shape), t, folded,
                                  **extra).prev_sample
            latents = step.reshape(1, num_frames, *step.shape[1:]).permute(0, 2, 1, 3, 4)
        latents = latents.clone()
        latents[:, :, 0] = first
    finally:
        if previous is not None:
            unet.set_attn_processor(previous)
        if hasattr(unet, "close_session"):  # a RemoteUNet: free the servers' state for this generation
            unet.close_session()
    if output_type == "latent":
        return VideoOutput(latents, latents)
    video = pipe.video_processor.postprocess_video(video=pipe.decode_latents(latents), output_type=output_type)
    return VideoOutput(video, latents)
