"""Tiny random-weight diffusers U-Nets for the splitter's unit tests, and a benchmark-sized U-Net.

The saved tiny pipelines (SD, SDXL, text-to-video) and their components live in ``swarm.hub.tiny_diffusion`` (the
offline quick start writes them too); tests import them from there. Here:

* :func:`tiny_unet` and :func:`tiny_unet_inputs`, standalone modules (not saved) for ``UNet2DConditionModel``
  (sd, sdxl: the same configs as the saved pipelines), ``UNet3DConditionModel``, ``UNetSpatioTemporalConditionModel``,
  ``I2VGenXLUNet`` and ``UNetMotionModel``. All have two levels of 32 and 64 channels.
* :func:`sd15_unet_config` and :func:`save_sd15_size_unet` (~860M parameters).
* :func:`as_served`, a local reference U-Net computed as the swarm computes it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    I2VGenXLUNet,
    MotionAdapter,
    UNet2DConditionModel,
    UNet3DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)

from swarm.hub.tiny_diffusion import (
    HIDDEN,
    TOKENS,
    VAE_SCALE,
    build_random,
    tiny_i2vgenxl_unet_config,
    tiny_sd_unet_config,
    tiny_sdxl_unet_config,
    tiny_unet3d_config,
)

UNET_KINDS = ("sd", "sdxl", "unet3d", "svd", "i2vgenxl", "motion")


def tiny_unet(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random U-Net in eval mode (float32, CPU); ``kind`` is one of :data:`UNET_KINDS`.

    sd/sdxl: ``UNet2DConditionModel`` (the same configs as the saved pipelines); unet3d: ``UNet3DConditionModel``;
    svd: ``UNetSpatioTemporalConditionModel``; i2vgenxl: ``I2VGenXLUNet``; motion: ``UNetMotionModel`` made by
    ``UNetMotionModel.from_unet2d(sd unet, MotionAdapter)``. All have two levels of 32 and 64 channels.
    """
    if kind == "sd":
        return build_random(UNet2DConditionModel, tiny_sd_unet_config(), seed)
    if kind == "sdxl":
        return build_random(UNet2DConditionModel, tiny_sdxl_unet_config(), seed)
    if kind == "unet3d":
        return build_random(UNet3DConditionModel, tiny_unet3d_config(), seed)
    if kind == "svd":
        # in_channels 8: the noisy latents concatenated with the conditioning image's latents.
        # projection_class_embeddings_input_dim = 3 added time ids (fps, motion bucket, noise aug) * 32.
        return build_random(UNetSpatioTemporalConditionModel, dict(
            sample_size=16, in_channels=8, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            cross_attention_dim=HIDDEN, num_attention_heads=(2, 4), addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=96, num_frames=8,
        ), seed)
    if kind == "i2vgenxl":
        return build_random(I2VGenXLUNet, tiny_i2vgenxl_unet_config(), seed)
    if kind == "motion":
        unet2d = build_random(UNet2DConditionModel, tiny_sd_unet_config(), seed)
        # block_out_channels and motion_layers_per_block must equal the 2-D U-Net's (from_unet2d checks).
        adapter = build_random(MotionAdapter, dict(
            block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=2,
            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True,
        ), seed + 1)
        return UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    raise ValueError(f"unknown tiny U-Net kind {kind!r}; expected one of {UNET_KINDS}")


def tiny_unet_inputs(kind: str, batch: int = 1, frames: int = 4, size: int = 16,
                     seed: int = 0) -> tuple[tuple, dict]:
    """Valid ``(args, kwargs)`` for ``tiny_unet(kind)(*args, **kwargs)``; ``size`` is the latent side (odd is fine).

    sample layouts: sd/sdxl ``(B, 4, S, S)``; unet3d/i2vgenxl/motion ``(B, 4, F, S, S)``; svd ``(B, F, 8, S, S)``.
    encoder_hidden_states: ``(B, 77, 32)`` (sdxl ``(B, 77, 64)``, svd ``(B, 1, 32)``, motion ``(B * F, 77, 32)``:
    UNetMotionModel does not repeat it per frame; AnimateDiff pipelines pass it already repeated, batch-major).
    sdxl: ``added_cond_kwargs={"text_embeds": (B, 32), "time_ids": (B, 6)}``; svd: ``added_time_ids (B, 3)``;
    i2vgenxl: ``fps (B,)``, ``image_latents (B, 4, F, S, S)``, ``image_embeddings (B, 32)``.
    The timestep is a 0-d tensor (the U-Nets broadcast it over the batch).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    timestep = torch.tensor(500)
    if kind == "sd":
        return (randn(batch, 4, size, size), timestep), {"encoder_hidden_states": randn(batch, TOKENS, HIDDEN)}
    if kind == "sdxl":
        pixels = float(size * VAE_SCALE)  # original size, crop top-left, target size
        time_ids = torch.tensor([pixels, pixels, 0.0, 0.0, pixels, pixels]).repeat(batch, 1)
        return (randn(batch, 4, size, size), timestep), {
            "encoder_hidden_states": randn(batch, TOKENS, 2 * HIDDEN),
            "added_cond_kwargs": {"text_embeds": randn(batch, 32), "time_ids": time_ids},
        }
    if kind == "unet3d":
        return (randn(batch, 4, frames, size, size), timestep), {"encoder_hidden_states": randn(batch, TOKENS, HIDDEN)}
    if kind == "svd":
        added_time_ids = torch.tensor([6.0, 127.0, 0.02]).repeat(batch, 1)  # fps - 1, motion bucket id, noise aug
        return (randn(batch, frames, 8, size, size), timestep), {
            "encoder_hidden_states": randn(batch, 1, HIDDEN), "added_time_ids": added_time_ids,
        }
    if kind == "i2vgenxl":
        return (randn(batch, 4, frames, size, size), timestep), {
            "fps": torch.full((batch,), 16), "image_latents": randn(batch, 4, frames, size, size),
            "image_embeddings": randn(batch, HIDDEN), "encoder_hidden_states": randn(batch, TOKENS, HIDDEN),
        }
    if kind == "motion":
        text = randn(batch, TOKENS, HIDDEN).repeat_interleave(frames, dim=0)
        return (randn(batch, 4, frames, size, size), timestep), {"encoder_hidden_states": text}
    raise ValueError(f"unknown tiny U-Net kind {kind!r}; expected one of {UNET_KINDS}")


# ------------------------------------------------------------------------------------- benchmark-sized U-Net


def sd15_unet_config() -> dict:
    """The real Stable Diffusion 1.5 U-Net configuration (``unet/config.json`` of SD 1.5): 859,520,964 parameters."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
    )


def save_sd15_size_unet(directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Build ``UNet2DConditionModel(**sd15_unet_config())`` with random weights and ``save_pretrained`` it to
    ``directory`` (load with ``UNet2DConditionModel.from_pretrained(directory)``); returns ``directory``.

    Slow and large: ~860M parameters, 3.4 GB of safetensors in float32 (1.7 GB with ``dtype=torch.float16``); the
    random initialisation and the write take tens of seconds and need several GB of RAM. Not for unit tests.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd15_unet_config()).eval()
    if dtype != torch.float32:
        unet = unet.to(dtype)
    directory = Path(directory)
    unet.save_pretrained(directory)
    return directory


def as_served(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` (in place) with its weights held as servers and clients hold theirs: frozen, and in memory torch
    allocated. Why: on some CPUs (seen on an AMD EPYC with torch 2.13) the kernels round differently for weights
    that require grad (a Linear on a non-contiguous input, as in the temporal transformers, is then folded into
    one matrix product) and for weights at other addresses (diffusers keeps safetensors' memory-mapped tensors,
    not 64-byte aligned, and MKL's products depend on alignment there): ~1e-7 relative, enough to break bitwise
    equality with a U-Net loaded by diffusers as it is."""
    for tensor in [*unet.parameters(), *unet.buffers()]:
        tensor.data = tensor.data.clone()
    return unet.requires_grad_(False)
