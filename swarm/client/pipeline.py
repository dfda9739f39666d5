"""``AutoDistributedPipeline.from_pretrained(MODEL_DIR, initial_peers=[...])``: a diffusers pipeline whose U-Net
runs in the swarm while the text encoders, scheduler and VAE stay local."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline, I2VGenXLPipeline, TextToVideoSDPipeline

from swarm.blocks.latent_shift import LatentShiftUNet
from swarm.blocks.unet import load_head_and_tail
from swarm.client.config import ClientConfig
from swarm.client.diffusion import RemoteUNet
from swarm.hub.source import default_model_id, resolve_model


class AutoDistributedPipeline:
    @staticmethod
    def from_pretrained(model_name_or_path: str | os.PathLike, *, initial_peers: Sequence[str] = (),
                        model_id: str | None = None, client_config: ClientConfig | None = None,
                        dtype: torch.dtype = torch.float32, latent_shift: bool = False,
                        **client_options: object) -> DiffusionPipeline:
        """The pipeline of ``model_name_or_path`` with ``pipe.unet`` replaced by a ``RemoteUNet``. Keywords as for
        ``AutoDistributedModelForCausalLM.from_pretrained`` (``compression``, ``routing_policy``, ...).

        ``latent_shift=True``: a Latent-Shift text-to-video pipeline (diffusers' ``TextToVideoSDPipeline``) made
        from an image model's components (an SD directory), its U-Net shifting features across frames on the
        servers (swarm/blocks/latent_shift.py). Like every pipeline here, each call closes its swarm session.

        An ``I2VGenXLPipeline`` comes with working defaults (see :func:`i2vgenxl_pipeline`)."""
        client_config = ClientConfig.with_options(client_config, initial_peers, client_options)
        source = resolve_model(model_name_or_path)
        model_id = model_id or client_config.model_id or default_model_id(model_name_or_path)
        head_and_tail = load_head_and_tail(source, dtype)
        # diffusers checks the components given to from_pretrained against the types the pipeline's __init__
        # declares ("Expected types for unet: ..."), and a RemoteUNet is no UNet2DConditionModel. The head and tail
        # are that U-Net's own class (blocks as weightless stand-ins), so the pipeline is built with them; then
        # its unet is replaced, as diffusers lets one swap a pipeline's component.
        pipe = DiffusionPipeline.from_pretrained(source.config_path, unet=head_and_tail, dtype=dtype)
        pipe.unet = RemoteUNet(head_and_tail, client_config, model_id)
        if latent_shift:
            pipe = latent_shift_pipeline(pipe)
        if isinstance(pipe, I2VGenXLPipeline):
            pipe = i2vgenxl_pipeline(pipe)
        pipe.__class__ = _closing_sessions(type(pipe))
        return pipe


def latent_shift_pipeline(image_pipe: DiffusionPipeline) -> TextToVideoSDPipeline:
    """A text-to-video pipeline from an image pipeline's components, its U-Net (local or remote) wrapped in
    ``LatentShiftUNet``."""
    if image_pipe.unet.config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel" or not all(
            hasattr(image_pipe, name) for name in ("vae", "text_encoder", "tokenizer", "scheduler")):
        raise ValueError("latent_shift=True needs an image model with one text encoder (a Stable Diffusion 1.x/2.x "
                         f"directory); got {type(image_pipe).__name__}")
    return TextToVideoSDPipeline(vae=image_pipe.vae, text_encoder=image_pipe.text_encoder,
                                 tokenizer=image_pipe.tokenizer, unet=LatentShiftUNet(image_pipe.unet),
                                 scheduler=image_pipe.scheduler)


def vae_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Images (batch, 3, H, W) in [-1, 1] -> their latents: the mode of the VAE's distribution (a given image is a
    condition, nothing about it is to be drawn at random) times its scaling factor."""
    with torch.no_grad():
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    return latents * vae.config.scaling_factor


class I2VGenXLDefaultsPipeline(I2VGenXLPipeline):
    """diffusers' ``I2VGenXLPipeline`` with two fixes, so that ``pipe(prompt=..., image=..., generator=...)`` works
    and is reproducible as it is:

    * ``clip_skip`` (default 1: I2VGen-XL conditions on the text encoder's penultimate layer) works on transformers
      versions whose ``CLIPTextModel`` has no ``text_model`` attribute, where diffusers' clip-skip path crashes.
    * The image's latents are the mode of the VAE's latent distribution, not a sample: diffusers draws that sample
      from the global RNG, ignoring ``generator``, so equal seeds gave different videos. The image is a condition,
      not something to sample (SVD's pipeline conditions on the mode too), and the VAE's spread is small.
    """

    def encode_prompt(self, *args, clip_skip: int | None = None, **kwargs):
        text_encoder = self.text_encoder
        if not clip_skip or hasattr(text_encoder, "text_model"):
            return super().encode_prompt(*args, clip_skip=clip_skip, **kwargs)
        # Skipping the last k layers then applying the final layer norm is what the encoder computes with those
        # layers left out: run it so, and restore them.
        layers = text_encoder.encoder.layers
        if not 0 < clip_skip < len(layers):
            raise ValueError(f"clip_skip={clip_skip} must leave at least one of the text encoder's {len(layers)} "
                             "layers")
        text_encoder.encoder.layers = layers[:len(layers) - clip_skip]
        try:
            return super().encode_prompt(*args, clip_skip=None, **kwargs)
        finally:
            text_encoder.encoder.layers = layers

    def prepare_image_latents(self, image: torch.Tensor, device: torch.device, num_frames: int,
                              num_videos_per_prompt: int) -> torch.Tensor:
        latents = vae_latents(self.vae, image)
        latents = latents.unsqueeze(2)  # (batch, channels, 1, h, w): the first frame
        # I2VGen-XL's position mask: frame i > 0 is a constant i / (num_frames - 1) in every channel.
        positions = torch.tensor([i / (num_frames - 1) for i in range(1, num_frames)], dtype=latents.dtype,
                                 device=device)  # Python floats, as diffusers computes them: the same roundings
        masks = torch.ones_like(latents).repeat(1, 1, num_frames - 1, 1, 1) * positions.view(1, 1, -1, 1, 1)
        latents = torch.cat([latents, masks], dim=2).repeat(num_videos_per_prompt, 1, 1, 1, 1)
        return torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents


def i2vgenxl_pipeline(pipe: I2VGenXLPipeline) -> I2VGenXLDefaultsPipeline:
    """``pipe``'s components (its U-Net local or remote) as an :class:`I2VGenXLDefaultsPipeline`:
    ``AutoDistributedPipeline`` does this for I2VGenXL directories; apply it to a local pipeline to run the same
    algorithm."""
    if not isinstance(pipe, I2VGenXLPipeline):
        raise ValueError(f"expected an I2VGenXLPipeline; got {type(pipe).__name__}")
    return I2VGenXLDefaultsPipeline(**pipe.components)


@functools.cache
def _closing_sessions(pipeline_class: type) -> type:
    """The pipeline class, with each call closing its swarm session at the end (freeing servers' state)."""

    def __call__(self, *args, **kwargs):
        try:
            return pipeline_class.__call__(self, *args, **kwargs)
        finally:
            self.unet.close_session()

    def save_pretrained(self, *args, **kwargs):
        self.unet.save_pretrained()  # refused: what it would write could not be loaded

    return type(f"Distributed{pipeline_class.__name__}", (pipeline_class,),
                {"__call__": __call__, "save_pretrained": save_pretrained})
