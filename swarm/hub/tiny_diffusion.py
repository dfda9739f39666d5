"""Tiny random-weight diffusers pipelines, written like hub checkpoints: a quick start that needs no download.

    python -m swarm.hub.tiny_diffusion sd DIR       # StableDiffusionPipeline
    python -m swarm.hub.tiny_diffusion video DIR    # TextToVideoSDPipeline
    python -m swarm.hub.tiny_diffusion sdxl DIR     # StableDiffusionXLPipeline

(``save_tiny_i2vgenxl`` also writes an image-to-video ``I2VGenXLPipeline``, for the tests and examples.)

writes the pipeline into DIR (a few MB, seconds), then prints the commands that serve its U-Net on two servers,
with ``--blocks`` ranges counted from the saved U-Net's levels, and the client code that generates through them.
The weights are random: images are noise; the point is to see the swarm work end to end, offline. The same
builders make the tests' tiny pipelines.

Shapes shared by all tiny pipelines:

* The VAE has four levels, so ``vae_scale_factor`` is 8 as in the real models: pixel size = 8 * latent size, and
  the pipelines' ``height % 8 == 0`` check leaves odd latent sizes possible (120 px -> 15x15 latents).
* The U-Nets have two down blocks (one down/up-sampling), so three levels (the mid block is the last): the latent
  side is halved once inside the U-Net. Odd latent sizes work because the U-Nets pass ``upsample_size`` to their up
  blocks when the side is not a multiple of 2. Default size: 128 px (16x16 latents).
* ``TOKENS`` (77) tokens of width ``HIDDEN`` (32) per prompt, as real CLIP has 77 tokens.

Tokenizer: there is no hub, so a real transformers ``CLIPTokenizer`` is built in memory from a generated
vocabulary: the 256 byte-level characters, each also with the ``</w>`` end-of-word suffix, plus ``<|startoftext|>``
(id 0) and ``<|endoftext|>`` (id 1, also unk and pad), and no merges: every word is spelled out one byte per token.
``save_pretrained`` writes it as ``tokenizer.json`` + ``tokenizer_config.json``, and ``CLIPTokenizer`` /
``AutoTokenizer.from_pretrained`` load it back. ``model_max_length`` is 77, equal to the text encoders'
``max_position_embeddings``, so the pipelines' ``tokenizer(..., padding="max_length", max_length=
tokenizer.model_max_length, truncation=True)`` calls work unchanged. The text encoders set ``eos_token_id=1`` so
CLIP pools at the first ``<|endoftext|>``.

diffusers and transformers are imported inside the functions, so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

TOKENS = 77  # tokenizer.model_max_length == text encoder max_position_embeddings
HIDDEN = 32  # text encoder width == SD/video U-Net cross_attention_dim
SDXL_TIME_EMBED = 8  # SDXL addition_time_embed_dim; 6 time ids -> 48, + text_encoder_2 projection (32) = 80
VAE_SCALE = 8  # 2 ** (len(vae block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------- components


def tiny_clip_tokenizer(model_max_length: int = TOKENS) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` over byte-level characters (514 tokens, no merges; see the module docstring)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = list(bytes_to_unicode().values())
    for suffix in ("", "</w>"):
        for char in chars:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _text_config(**overrides: object) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    config = dict(vocab_size=514, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    config.update(overrides)
    return CLIPTextConfig(**config)


def tiny_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A 2-layer ``CLIPTextModel`` of width 32 covering :func:`tiny_clip_tokenizer`'s 514 ids, 77 positions."""
    import torch
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(_text_config()).eval()


def tiny_text_encoder_with_projection(seed: int = 0) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder: a 2-layer ``CLIPTextModelWithProjection``, width 32, ``projection_dim`` 32."""
    import torch
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config(projection_dim=32)).eval()


IMAGE_ENCODER_SIZE = 32  # pixels the tiny CLIP image encoder sees (I2VGenXL resizes its image to this)


def tiny_image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    """A 2-layer CLIP vision tower (32 px images in 8 px patches, width 32) projecting to ``HIDDEN``: the image
    embedding I2VGenXL's U-Net takes at the text states' width."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_ENCODER_SIZE, patch_size=8, projection_dim=HIDDEN, hidden_act="gelu")
    return CLIPVisionModelWithProjection(config).eval()


def tiny_clip_image_processor() -> CLIPImageProcessor:
    """CLIP's preprocessing (resize, center crop, CLIP's mean and std) to the tiny image encoder's 32 px."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_ENCODER_SIZE},
                              crop_size={"height": IMAGE_ENCODER_SIZE, "width": IMAGE_ENCODER_SIZE})


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A four-level ``AutoencoderKL`` (``vae_scale_factor`` 8, like the real ones) with 4 latent channels."""
    import torch
    from diffusers import AutoencoderKL

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
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_scheduler_config(), clip_sample=False, set_alpha_to_one=False)


def tiny_euler_scheduler() -> EulerDiscreteScheduler:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**_scheduler_config(), timestep_spacing="leading")


# --------------------------------------------------------------------------------------------------- U-Nets


def tiny_sd_unet_config() -> dict:
    """The tiny SD U-Net: two down blocks (32, 64 channels), 2 resnets each, cross-attention width 32."""
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
    """The tiny text-to-video ``UNet3DConditionModel``: two down blocks (32, 64), cross-attention width 32.

    ``attention_head_dim`` 8 is, by a diffusers naming quirk, the number of heads of the spatial transformers."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )


def tiny_i2vgenxl_unet_config() -> dict:
    """The tiny ``I2VGenXLUNet``: two down blocks (32, 64), cross-attention (and image embedding) width 32.

    ``in_channels`` must be 4: ``image_latents_proj_in`` maps the 4 latent channels to ``in_channels`` and is
    reshaped with them."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=32,
    )


def build_random(cls: type, config: dict, seed: int) -> torch.nn.Module:
    """``cls(**config)`` in eval mode with seeded random weights, zero-initialised tensors included (see
    :func:`randomize_zero_init`)."""
    import torch

    torch.manual_seed(seed)
    model = cls(**config).eval()
    randomize_zero_init(model)
    return model


def randomize_zero_init(model: torch.nn.Module) -> None:
    """Give zero-initialised weight tensors the default random init, so every path changes the output.

    Diffusers zero-initialises the last conv of each ``TemporalConvLayer`` (UNet3DConditionModel, I2VGenXLUNet), which
    makes the temporal convs identities; with random weights here, a splitter that drops them or mixes up frames
    gives a different output.
    """
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                torch.nn.init.kaiming_uniform_(param, a=5**0.5)


# ------------------------------------------------------------------------------------------ saved pipelines


def save_tiny_sd(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random ``StableDiffusionPipeline`` (unet, vae, text_encoder, tokenizer, scheduler; no safety
    checker or feature extractor) to ``directory`` and return it. Default size: 128 px (16 latents)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2), tokenizer=tiny_clip_tokenizer(),
        unet=build_random(UNet2DConditionModel, tiny_sd_unet_config(), seed), scheduler=tiny_ddim_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


def save_tiny_sdxl(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random ``StableDiffusionXLPipeline`` (two text encoders and tokenizers, EulerDiscreteScheduler,
    ``force_zeros_for_empty_prompt`` True as in SDXL) to ``directory`` and return it. Default size: 128 px."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2),
        text_encoder_2=tiny_text_encoder_with_projection(seed + 3), tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(), unet=build_random(UNet2DConditionModel, tiny_sdxl_unet_config(), seed),
        scheduler=tiny_euler_scheduler(), image_encoder=None, feature_extractor=None,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


def save_tiny_text_to_video(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random ``TextToVideoSDPipeline`` (UNet3DConditionModel, DDIMScheduler) to ``directory`` and
    return it. Default size: 128 px (16 latents); pass ``num_frames`` (the pipeline's default is 16)."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    pipe = TextToVideoSDPipeline(
        vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2), tokenizer=tiny_clip_tokenizer(),
        unet=build_random(UNet3DConditionModel, tiny_unet3d_config(), seed), scheduler=tiny_ddim_scheduler(),
    )
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


def save_tiny_i2vgenxl(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random image-to-video ``I2VGenXLPipeline`` (I2VGenXLUNet, a CLIP text encoder and tokenizer, a
    CLIP image encoder with its image processor, DDIMScheduler) to ``directory`` and return it. Default size:
    128 px (16 latents); pass ``num_frames`` (the pipeline's default is 16)."""
    from diffusers import I2VGenXLPipeline, I2VGenXLUNet

    pipe = I2VGenXLPipeline(
        vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2), tokenizer=tiny_clip_tokenizer(),
        image_encoder=tiny_image_encoder(seed + 3), feature_extractor=tiny_clip_image_processor(),
        unet=build_random(I2VGenXLUNet, tiny_i2vgenxl_unet_config(), seed), scheduler=tiny_ddim_scheduler(),
    )
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


def save_tiny_unet_lora(pipeline_directory: str | os.PathLike, directory: str | os.PathLike, seed: int = 0,
                        rank: int = 4, alpha: float | None = 8.0,
                        target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"),
                        text_encoder: bool = False) -> Path:
    """Save a random LoRA of the U-Net in ``pipeline_directory`` as diffusers' ``save_lora_weights`` does
    (``pytorch_lora_weights.safetensors``; with its config recorded unless ``alpha`` is None) to ``directory`` and
    return it. ``text_encoder``: the LoRA also adapts the text encoder's attention."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_directory) / "unet")
    # init_lora_weights=False: random B as well as A, so the LoRA changes what the U-Net computes
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules),
                        init_lora_weights=False)
    unet.add_adapter(config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(unet)}
    if alpha is not None:
        layers["unet_lora_adapter_metadata"] = config.to_dict()
    if text_encoder:
        encoder_config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)
        encoder = inject_adapter_in_model(encoder_config, tiny_text_encoder())
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
        if alpha is not None:  # diffusers reads each part's config, when one is recorded, from the file
            layers["text_encoder_lora_adapter_metadata"] = encoder_config.to_dict()
    directory = Path(directory)
    StableDiffusionPipeline.save_lora_weights(directory, **layers)
    return directory


# ------------------------------------------------------------------------------------------------ quick start

# kind -> (saver, the pipeline class it writes, the client lines that generate and save the result)
KINDS = {
    "sd": (save_tiny_sd, "StableDiffusionPipeline",
           ['image = pipe("a lighthouse at dawn", num_inference_steps=10).images[0]', 'image.save("tiny-sd.png")']),
    "sdxl": (save_tiny_sdxl, "StableDiffusionXLPipeline",
             ['image = pipe("a lighthouse at dawn", num_inference_steps=10).images[0]',
              'image.save("tiny-sdxl.png")']),
    "video": (save_tiny_text_to_video, "TextToVideoSDPipeline",
              ['video = pipe("a lighthouse at dawn", num_inference_steps=10, num_frames=8, output_type="pil")',
               'frames = video.frames[0]',
               'frames[0].save("tiny-video.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)']),
}


CLIENT_CODE_FOLLOWS = "Then generate from Python with the U-Net in the swarm:"


def unet_levels(directory: str | os.PathLike) -> int:
    """How many levels a pipeline's (or a bare U-Net directory's) U-Net is served as: one per down block (with the
    up block that consumes its skips), plus the mid block. ``--blocks`` ranges of a U-Net server count these."""
    from swarm.blocks.unet import load_unet_config
    from swarm.hub.source import resolve_model

    config, _ = load_unet_config(resolve_model(directory))
    return len(config["down_block_types"]) + 1


def level_ranges(levels: int, servers: int) -> list[tuple[int, int]]:
    """Contiguous ``--blocks`` ranges splitting ``levels`` over ``servers`` as evenly as possible (later ranges
    take the extra level: the deepest levels work on the smallest samples). SD 1.5's 5 levels on 2: 0:2, 2:5."""
    servers = max(1, min(servers, levels))
    bounds = [i * levels // servers for i in range(servers + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def quick_start(directory: str | os.PathLike, kind: str, servers: int = 2) -> str:
    """What to run next for the pipeline in ``directory``: the server commands and the client code."""
    directory = Path(directory).resolve()
    path = shlex.quote(str(directory))
    levels = unet_levels(directory)
    ranges = level_ranges(levels, servers)
    lines = [f"Its U-Net has {levels} levels (one per down block with its up block, then the mid block); "
             "--blocks ranges count levels.", "",
             f"Serve it on {len(ranges)} server{'s' if len(ranges) > 1 else ''}, each in a terminal of its own:"]
    for i, (start, end) in enumerate(ranges):
        join = " --initial-peers MADDR" if i else ""
        lines.append(f"  python -m swarm.server {path} --blocks {start}:{end} --host 127.0.0.1{join}")
    lines += ["where MADDR is the address the first server prints after 'Join this swarm with: --initial-peers'",
              "(leave out --host 127.0.0.1 to let other machines join).", "",
              CLIENT_CODE_FOLLOWS, "",
              "from swarm import AutoDistributedPipeline", "",
              f"pipe = AutoDistributedPipeline.from_pretrained({str(directory)!r}, initial_peers=['MADDR'])",
              *KINDS[kind][2], "pipe.unet.shutdown()  # closes the client's connection to the swarm"]
    return "\n".join(lines)


def write_pipeline(directory: str | os.PathLike, kind: str, seed: int = 0) -> bool:
    """Write the tiny ``kind`` pipeline into ``directory`` unless it holds a pipeline of that class already (tiny or
    not: the commands are then printed for it); returns whether it wrote.

    Written into a temporary directory beside it and renamed into place, so that an interrupted run never leaves a
    half-written pipeline that a later run would take for a whole one. A directory holding anything else is
    refused."""
    save, class_name = KINDS[kind][:2]
    directory = Path(directory).expanduser()
    index = directory / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == class_name:
        return False
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not empty: name a new or empty directory")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # A few MB: the save's progress bars would only bury the instructions printed after it.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        save(staging, seed)
        staging.rename(directory)  # atomic; replaces an empty directory
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m swarm.hub.tiny_diffusion",
        description="Write a tiny random-weight diffusers pipeline (no download) and print how to serve its U-Net "
                    "in a local swarm and generate through it.")
    parser.add_argument("kind", choices=sorted(KINDS), help="sd: Stable Diffusion; sdxl: SDXL; video: text-to-video")
    parser.add_argument("directory", type=Path, help="where to write it (new or empty)")
    parser.add_argument("--servers", type=int, default=2, help="how many servers to split the U-Net's levels over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    if args.servers < 1:
        parser.error("--servers must be at least 1")
    try:
        wrote = write_pipeline(args.directory, args.kind, args.seed)
    except FileExistsError as e:
        parser.error(str(e))
    class_name, where = KINDS[args.kind][1], args.directory.resolve()
    print(f"Wrote a tiny random {class_name} in {where} (random weights: it generates noise)." if wrote else
          f"Found a {class_name} in {where}: left as it is.")
    print(quick_start(args.directory, args.kind, args.servers), flush=True)


if __name__ == "__main__":
    sys.exit(main())
