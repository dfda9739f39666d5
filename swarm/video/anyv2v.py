"""AnyV2V-style video editing with an I2VGen-XL pipeline (local, or its U-Net served by the swarm).

AnyV2V (Ku et al., 2024) edits a video without training: (1) edit its first frame with any image editor, (2) DDIM-
invert the source video with the image-to-video model conditioned on the source's first frame, (3) generate from
the inverted noise conditioned on the edited first frame, injecting the source's features during the first steps:
ResNet outputs and self-attention queries and keys of the decoder (spatial and temporal), captured while inverting.
That keeps the source's motion and layout and takes the edit's appearance.

Through the swarm the features stay on the servers that computed them: the inversion captures them in the
session of a feature bank (``RemoteUNet.feature_bank``), generation injects them in the same session (its new
conditioning is sent mid-session), and closing the bank frees them. The same function runs a local pipeline with
a ``LocalFeatureBank``, so both give the same video for the same inputs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import I2VGenXLPipeline
from diffusers.pipelines.deprecated.i2vgen_xl.pipeline_i2vgen_xl import _center_crop_wide, _resize_bilinear

from swarm.blocks.unet_modifiers import LocalFeatureBank, feature_places
from swarm.client.pipeline import I2VGenXLDefaultsPipeline, i2vgenxl_pipeline, vae_latents

_UP = re.compile(r"^up_blocks\.(\d+)\.")


@dataclass
class EditOutput:
    frames: object  # as ``output_type`` asks (``pt``: (1, frames, 3, height, width) in [0, 1])
    latents: torch.Tensor  # the edited video's latents, (1, channels, frames, h, w)
    inverted: torch.Tensor  # the source video's latents inverted to the first step's noise
    edited_first_frame: torch.Tensor  # (1, 3, height, width) in [0, 1]


def injection_places(unet) -> tuple[list[str], list[str]]:
    """AnyV2V's places: the decoder's ResNet outputs (all up blocks but the coarsest), and its self-attention
    queries and keys (spatial and temporal)."""
    places = [p for p in getattr(unet, "swarm_feature_places", None) or feature_places(unet) if _UP.match(p)]
    conv = [p for p in places if ".resnets." in p and int(_UP.match(p).group(1)) > 0]
    return conv, [p for p in places if p.endswith((".q", ".k"))]


def feature_bytes(unet, places: list[str], frames: int, height: int, width: int, captures: int) -> dict[str, int]:
    """An upper bound of the bytes ``captures`` captures of each of ``places`` take for one video (float32): a
    place of up block j holds frames x its pixels x its channels (queries and keys are as wide as the block). A
    server reserves the sum over the places of its own levels."""
    channels = list(reversed(unet.config.block_out_channels))
    levels = len(channels)
    sizes = {}
    for place in places:
        block = int(_UP.match(place).group(1))
        h, w = height, width
        for _ in range(levels - 1 - block):  # up block j works at the size of down block levels-1-j
            h, w = -(-h // 2), -(-w // 2)
        sizes[place] = frames * h * w * channels[block] * 4 * captures
    return sizes


def _conditioning(pipe: I2VGenXLPipeline, image: torch.Tensor, prompt: str, negative_prompt: str | None,
                  num_frames: int, guidance_scale: float, fps: int) -> dict:
    """The U-Net's conditioning for ``image`` ((1, 3, H, W) in [0, 1]) and ``prompt``, as I2VGenXLPipeline makes it."""
    height, width = image.shape[-2:]
    pipe._guidance_scale = guidance_scale  # do_classifier_free_guidance reads it
    text, negative = pipe.encode_prompt(prompt, image.device, 1, negative_prompt)
    guided = guidance_scale > 1
    embeddings = torch.cat([negative, text]) if guided else text
    extractor = pipe.feature_extractor
    cropped = _resize_bilinear(_center_crop_wide(image, (width, width)),
                               (extractor.crop_size["width"], extractor.crop_size["height"]))
    image_embeddings = pipe._encode_image(cropped, image.device, 1)
    resized = pipe.video_processor.preprocess(_center_crop_wide(image, (width, height))).to(embeddings.dtype)
    image_latents = pipe.prepare_image_latents(resized, image.device, num_frames, 1)
    return {"encoder_hidden_states": embeddings, "image_latents": image_latents, "image_embeddings": image_embeddings,
            "fps": torch.tensor([fps] * (2 if guided else 1))}


def _encode_video(pipe: I2VGenXLPipeline, video: torch.Tensor) -> torch.Tensor:
    """(frames, 3, H, W) in [0, 1] -> (1, channels, frames, h, w) latents (the VAE's mode: nothing sampled)."""
    return vae_latents(pipe.vae, pipe.video_processor.preprocess(video)).permute(1, 0, 2, 3)[None]


@torch.no_grad()
def anyv2v(pipe: I2VGenXLPipeline, source: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
           prompt: str, source_prompt: str = "", negative_prompt: str | None = None, num_inference_steps: int = 25,
           guidance_scale: float = 9.0, conv_injection: float = 0.2, spatial_attention_injection: float = 0.2,
           temporal_attention_injection: float = 0.5,
           fps: int = 8, max_feature_bytes: int | dict[str, int] | None = None,
           output_type: str = "pt") -> EditOutput:
    """Edit ``source`` ((frames, 3, H, W) in [0, 1]) as ``edit`` edits its first frame: ``edit`` is a function of the
    first frame ((1, 3, H, W) in [0, 1], e.g. an img2img pipeline through the swarm) or the edited frame itself.
    Features are injected during the first ``conv_injection`` (ResNet outputs), ``spatial_attention_injection``
    and ``temporal_attention_injection`` (queries and keys) shares of the steps (AnyV2V's defaults: 0.2, 0.2, 0.5).
    ``max_feature_bytes``: what each server may keep, or per place (default: an upper bound per place for the
    whole inversion, so each server reserves for the places it holds)."""
    if not isinstance(pipe, I2VGenXLPipeline):
        raise ValueError(f"anyv2v needs an I2VGenXL pipeline, got {type(pipe).__name__}")
    if not isinstance(pipe, I2VGenXLDefaultsPipeline):
        pipe = i2vgenxl_pipeline(pipe)  # deterministic image latents (see swarm/client/pipeline.py)
    if not isinstance(source, torch.Tensor) or source.dim() != 4 or source.shape[1] != 3 or source.shape[0] < 2:
        raise ValueError("source must be a (frames >= 2, 3, height, width) video in [0, 1]")
    shares = (conv_injection, spatial_attention_injection, temporal_attention_injection)
    if not all(0 <= share <= 1 for share in shares):
        raise ValueError("conv_injection and the attention injections are shares of the steps, in [0, 1]")
    frames, (height, width) = source.shape[0], source.shape[-2:]
    first = source[:1]
    edited = edit(first) if callable(edit) else edit
    if not isinstance(edited, torch.Tensor) or edited.shape != first.shape:
        raise ValueError(f"the edited first frame must be a tensor of shape {list(first.shape)} in [0, 1]")
    unet, scheduler = pipe.unet, pipe.scheduler
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps  # descending
    conv, attention = injection_places(unet)
    steps = len(timesteps)
    groups = [(conv, round(conv_injection * steps)),
              ([p for p in attention if ".temp_attentions." not in p], round(spatial_attention_injection * steps)),
              ([p for p in attention if ".temp_attentions." in p], round(temporal_attention_injection * steps))]

    def injected(step: int) -> list[str]:  # the places injected at sampling step ``step`` (0: the noisiest)
        return [place for places, count in groups if step < count for place in places]

    latent_h, latent_w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    if max_feature_bytes is None:
        max_feature_bytes = {place: size for places, count in groups for place, size in
                             feature_bytes(unet, places, frames, latent_h, latent_w, max(count, 1)).items()}
    remote = hasattr(unet, "feature_bank")
    bank = unet.feature_bank(max_feature_bytes) if remote else LocalFeatureBank(unet, max_feature_bytes)
    try:
        # DDIM inversion of the source, conditioned on its own first frame, capturing the injected steps' features
        latents = _encode_video(pipe, source)
        condition = _conditioning(pipe, first, source_prompt, None, frames, 1.0, fps)
        alphas = scheduler.alphas_cumprod
        previous = scheduler.final_alpha_cumprod
        ascending = timesteps.flip(0)
        for index, t in enumerate(ascending):
            step = steps - 1 - index  # the sampling step that will use this timestep
            places = injected(step)
            with bank.capture(f"t{int(t)}", places) if places else contextlib.nullcontext():
                noise = unet(latents, t, **condition, return_dict=False)[0]
            alpha = alphas[int(t)]
            clean = (latents - (1 - previous).sqrt() * noise) / previous.sqrt()
            latents = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
            previous = alpha
        inverted = latents
        # generation from the inverted noise, conditioned on the edited frame, with the source's features
        condition = _conditioning(pipe, edited, prompt, negative_prompt, frames, guidance_scale, fps)
        guided = guidance_scale > 1
        latents = inverted.clone()
        for step, t in enumerate(timesteps):
            places = injected(step)
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            with bank.inject(f"t{int(t)}", places) if places else contextlib.nullcontext():
                noise = unet(model_input, t, **condition, return_dict=False)[0]
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            folded = latents.permute(0, 2, 1, 3, 4).reshape(frames, latents.shape[1], *latents.shape[3:])
            out = scheduler.step(noise.permute(0, 2, 1, 3, 4).reshape(folded.shape), t, folded).prev_sample
            latents = out.reshape(1, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)
    finally:
        bank.close()
        if remote:
            unet.close_session()
    if output_type == "latent":
        return EditOutput(latents, latents, inverted, edited)
    video = pipe.video_processor.postprocess_video(video=pipe.decode_latents(latents), output_type=output_type)
    return EditOutput(video, latents, inverted, edited)

