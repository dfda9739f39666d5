"""Tiny random-weight diffusers models, saved like hub checkpoints so tests load them with the real loading code.

Saved pipelines (``DiffusionPipeline.from_pretrained(directory)`` works offline, and so does
``UNet2DConditionModel.from_pretrained(directory / "unet")`` etc.):

* :func:`save_tiny_sd` -- ``StableDiffusionPipeline`` (UNet2DConditionModel, DDIMScheduler).
* :func:`save_tiny_sdxl` -- ``StableDiffusionXLPipeline`` (two text encoders, ``text_time`` added conditioning,
  EulerDiscreteScheduler).
* :func:`save_tiny_text_to_video` -- ``TextToVideoSDPipeline`` (UNet3DConditionModel, DDIMScheduler).

Standalone modules (not saved) for U-Net splitter unit tests: :func:`tiny_unet` and :func:`tiny_unet_inputs` for
``UNet2DConditionModel`` (sd, sdxl), ``UNet3DConditionModel``, ``UNetSpatioTemporalConditionModel``,
``I2VGenXLUNet`` and ``UNetMotionModel``.

A benchmark-sized U-Net: :func:`sd15_unet_config` and :func:`save_sd15_size_unet` (~860M parameters).

Shapes shared by all tiny pipelines:

* The VAE has four levels, so ``vae_scale_factor`` is 8 as in the real models: pixel size = 8 * latent size, and
  the pipelines' ``height % 8 == 0`` check leaves odd latent sizes possible (120 px -> 15x15 latents).
* The U-Nets have two levels (one down/up-sampling): the latent side is halved once inside the U-Net. Odd latent
  sizes work because the U-Nets pass ``upsample_size`` to their up blocks when the side is not a multiple of 2.
* ``TOKENS`` (77) tokens of width ``HIDDEN`` (32) per prompt, as real CLIP has 77 tokens.

Tokenizer: there is no hub, so a real transformers ``CLIPTokenizer`` (the tokenizers-backed class of transformers 5)
is built in memory from a generated vocabulary: the 256 byte-level characters, each also with the ``</w>``
end-of-word suffix, plus ``<|startoftext|>`` (id 0) and ``<|endoftext|>`` (id 1, also unk and pad), and no merges:
every word is spelled out one byte per token. ``save_pretrained`` writes it as ``tokenizer.json`` +
``tokenizer_config.json`` (transformers 5 writes no vocab.json/merges.txt), and ``CLIPTokenizer.from_pretrained``
/ ``AutoTokenizer.from_pretrained`` load it back. ``model_max_length`` is 77, equal to the text encoders'
``max_position_embeddings``, so the pipelines' ``tokenizer(..., padding="max_length",
max_length=tokenizer.model_max_length, truncation=True)`` calls work unchanged. The text encoders set
``eos_token_id=1`` so CLIP pools at the first ``<|endoftext|>``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    I2VGenXLUNet,
    MotionAdapter,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

TOKENS = 77  # tokenizer.model_max_length == text encoder max_position_embeddings
HIDDEN = 32  # text encoder width == SD/video U-Net cross_attention_dim
SDXL_TIME_EMBED = 8  # SDXL addition_time_embed_dim; 6 time ids -> 48, + text_encoder_2 projection (32) = 80
VAE_SCALE = 8  # 2 ** (len(vae block_out_channels) - 1)
UNET_KINDS = ("sd", "sdxl", "unet3d", "svd", "i2vgenxl", "motion")


# ----------------------------------------------------------------------------------------------- components


def tiny_clip_tokenizer(model_max_length: int = TOKENS) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` over byte-level characters (514 tokens, no merges; see the module docstring)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = list(bytes_to_unicode().values())
    for suffix in ("", "</w>"):
        for char in chars:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _text_config(**overrides) -> CLIPTextConfig:
    config = dict(vocab_size=514, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    config.update(overrides)
    return CLIPTextConfig(**config)


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A 2-layer ``CLIPTextModel`` of width 32 covering :func:`tiny_clip_tokenizer`'s 514 ids, 77 positions."""
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config()).eval()


def tiny_text_encoder_with_projection(seed: int = 0) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder: a 2-layer ``CLIPTextModelWithProjection``, width 32, ``projection_dim`` 32."""
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config(projection_dim=32)).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A four-level ``AutoencoderKL`` (``vae_scale_factor`` 8, like the real ones) with 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
    ).eval()


def _scheduler_config() -> dict:
    """The Stable Diffusion noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, prediction_type="epsilon")


def tiny_ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**_scheduler_config(), clip_sample=False, set_alpha_to_one=False)


def tiny_euler_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(**_scheduler_config(), timestep_spacing="leading")


# --------------------------------------------------------------------------------------------------- U-Nets


def tiny_sd_unet_config() -> dict:
    """The tiny SD U-Net: two levels (32, 64 channels), 2 resnets per level, cross-attention width 32."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )


def tiny_sdxl_unet_config() -> dict:
    """The tiny SDXL U-Net: like SDXL's (down DownBlock2D then cross-attention, linear projections, ``text_time``
    added conditioning), cross-attention width 64 (= 32 + 32 from the two text encoders) and
    ``projection_class_embeddings_input_dim`` 80 (= 6 time ids * 8 + the 32-wide pooled text embedding)."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=2 * HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + 32, norm_num_groups=32,
    )


def tiny_unet3d_config() -> dict:
    """The tiny text-to-video ``UNet3DConditionModel``: two levels (32, 64), cross-attention width 32.

    ``attention_head_dim`` 8 is, by a diffusers naming quirk, the number of heads of the spatial transformers."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )


def _build(cls, config: dict, seed: int):
    torch.manual_seed(seed)
    model = cls(**config).eval()
    _randomize_zero_init(model)
    return model


def _randomize_zero_init(model: torch.nn.Module) -> None:
    """Give zero-initialised weight tensors the default random init, so every path changes the output.

    Diffusers zero-initialises the last conv of each ``TemporalConvLayer`` (UNet3DConditionModel, I2VGenXLUNet), which
    makes the temporal convs identities; with random weights here, a splitter that drops them or mixes up frames
    gives a different output.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                torch.nn.init.kaiming_uniform_(param, a=5**0.5)


def tiny_unet(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random U-Net in eval mode (float32, CPU); ``kind`` is one of :data:`UNET_KINDS`.

    sd/sdxl: ``UNet2DConditionModel`` (the same configs as the saved pipelines); unet3d: ``UNet3DConditionModel``;
    svd: ``UNetSpatioTemporalConditionModel``; i2vgenxl: ``I2VGenXLUNet``; motion: ``UNetMotionModel`` made by
    ``UNetMotionModel.from_unet2d(sd unet, MotionAdapter)``. All have two levels of 32 and 64 channels.
    """
    if kind == "sd":
        return _build(UNet2DConditionModel, tiny_sd_unet_config(), seed)
    if kind == "sdxl":
        return _build(UNet2DConditionModel, tiny_sdxl_unet_config(), seed)
    if kind == "unet3d":
        return _build(UNet3DConditionModel, tiny_unet3d_config(), seed)
    if kind == "svd":
        # in_channels 8: the noisy latents concatenated with the conditioning image's latents.
        # projection_class_embeddings_input_dim = 3 added time ids (fps, motion bucket, noise aug) * 32.
        return _build(UNetSpatioTemporalConditionModel, dict(
            sample_size=16, in_channels=8, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            cross_attention_dim=HIDDEN, num_attention_heads=(2, 4), addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=96, num_frames=8,
        ), seed)
    if kind == "i2vgenxl":
        # in_channels must be 4: image_latents_proj_in maps 4 channels to in_channels and is reshaped with them.
        return _build(I2VGenXLUNet, dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
            cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=32,
        ), seed)
    if kind == "motion":
        unet2d = _build(UNet2DConditionModel, tiny_sd_unet_config(), seed)
        # block_out_channels and motion_layers_per_block must equal the 2-D U-Net's (from_unet2d checks).
        adapter = _build(MotionAdapter, dict(
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


# ------------------------------------------------------------------------------------------ saved pipelines


def save_tiny_sd(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random ``StableDiffusionPipeline`` (unet, vae, text_encoder, tokenizer, scheduler; no safety
    checker or feature extractor) to ``directory`` and return it. Default size: 128 px (16 latents)."""
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2), tokenizer=tiny_clip_tokenizer(),
        unet=_build(UNet2DConditionModel, tiny_sd_unet_config(), seed), scheduler=tiny_ddim_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


def save_tiny_sdxl(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random ``StableDiffusionXLPipeline`` (two text encoders and tokenizers, EulerDiscreteScheduler,
    ``force_zeros_for_empty_prompt`` True as in SDXL) to ``directory`` and return it. Default size: 128 px."""
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2),
        text_encoder_2=tiny_text_encoder_with_projection(seed + 3), tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(), unet=_build(UNet2DConditionModel, tiny_sdxl_unet_config(), seed),
        scheduler=tiny_euler_scheduler(), image_encoder=None, feature_extractor=None,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


def save_tiny_text_to_video(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random ``TextToVideoSDPipeline`` (UNet3DConditionModel, DDIMScheduler) to ``directory`` and
    return it. Default size: 128 px (16 latents); pass ``num_frames`` (the pipeline's default is 16)."""
    pipe = TextToVideoSDPipeline(
        vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2), tokenizer=tiny_clip_tokenizer(),
        unet=_build(UNet3DConditionModel, tiny_unet3d_config(), seed), scheduler=tiny_ddim_scheduler(),
    )
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


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
