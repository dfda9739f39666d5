"""Diffusion U-Nets cut into stages: head, down blocks, mid, up blocks, tail; one generic splitter for diffusers'
UNet2DConditionModel (SD 1.x/2.x, SDXL), UNet3DConditionModel, UNetSpatioTemporalConditionModel, I2VGenXLUNet and
UNetMotionModel. All fold video frames into the batch and run the same down/mid/up loop.

The head is each model's own forward up to its first down block (captured with a pre-hook that stops it there),
so every class's conditioning (text-time embeddings, fps, image latents, frame folding...) is reused as is. The
tail is norm, activation, conv_out and the model's frame unfolding.

Served U-shaped: *level* i < n holds down block i and up block n-1-i, level n holds the mid block. Up block n-1-i
consumes exactly the skips level i produced (the input of down block i, then its resnets' outputs), so skip tensors
never leave the server of their level; only ``sample`` travels. Head and tail stay with the client, like an LLM's
embeddings and head.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field

import diffusers
import torch
from torch import nn

from swarm.blocks import latent_shift
from swarm.blocks.checkpoint import Checkpoint
from swarm.hub.source import ModelSource

UNET_CLASSES = ("UNet2DConditionModel", "UNet3DConditionModel", "UNetSpatioTemporalConditionModel", "I2VGenXLUNet",
                "UNetMotionModel")
CROSS_ATTENTION_KWARGS = ("encoder_hidden_states", "attention_mask", "cross_attention_kwargs",
                          "encoder_attention_mask")
BLOCK_PREFIXES = ("down_blocks.", "up_blocks.", "mid_block.")


class _StopAtFirstBlock(Exception):
    pass


@dataclass
class HeadOutput:
    """The state entering the first down block, and what the tail needs."""

    sample: torch.Tensor  # (batch * frames, channels, height, width)
    temb: torch.Tensor  # time (and added conditioning) embedding
    encoder_hidden_states: torch.Tensor | None  # as the blocks see them (processed, repeated per frame...)
    extra: dict = field(default_factory=dict)  # other block arguments: num_frames, image_only_indicator, ...
    batch_size: int = 1
    num_frames: int | None = None  # None for image models
    forward_upsample_size: bool = False  # latent size not a multiple of the total upsampling factor
    latent_shift_frames: int | None = None  # Latent-Shift along this many frames folded in the batch (latent_shift.py)


def unet_class(config: dict) -> type[nn.Module]:
    name = config.get("_class_name")
    if name not in UNET_CLASSES:
        raise NotImplementedError(f"U-Net class {name!r} is not supported; supported: {list(UNET_CLASSES)}")
    return getattr(diffusers, name)


def num_levels(unet: nn.Module) -> int:
    return len(unet.down_blocks) + 1


def check_pairing(unet: nn.Module) -> None:
    """The standard layout: every down block but the last downsamples, and each up block takes one skip more than
    its paired down block has resnets (that one being the down block's input)."""
    n = len(unet.down_blocks)
    for i, down in enumerate(unet.down_blocks):
        if bool(getattr(down, "downsamplers", None)) != (i < n - 1):
            raise NotImplementedError(f"down block {i} {'lacks' if i < n - 1 else 'has'} a downsampler: "
                                      "this U-Net's skips do not pair by level")
        up = unet.up_blocks[n - 1 - i]
        if len(up.resnets) != len(down.resnets) + 1:
            raise NotImplementedError(f"up block {n - 1 - i} takes {len(up.resnets)} skips but down block {i} "
                                      f"makes {len(down.resnets) + 1}: this U-Net's skips do not pair by level")


def run_head(unet: nn.Module, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
             **kwargs) -> HeadOutput:
    """The model's own forward up to the first down block, whose inputs are captured."""
    captured: dict = {}

    def capture(module, args, block_kwargs):
        captured.update(block_kwargs)
        raise _StopAtFirstBlock

    hook = unet.down_blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)
        raise RuntimeError("the U-Net returned without calling its first down block")
    except _StopAtFirstBlock:
        pass
    finally:
        hook.remove()
    hidden = captured.pop("hidden_states")
    temb = captured.pop("temb")
    ehs = captured.pop("encoder_hidden_states", encoder_hidden_states)
    for name in CROSS_ATTENTION_KWARGS[1:]:
        if captured.get(name) is not None:
            raise NotImplementedError(f"{name} is not supported through the swarm yet")
        captured.pop(name, None)
    extra = {k: v for k, v in captured.items() if v is not None}
    video = sample.dim() == 5
    factor = up_factor(unet)
    return HeadOutput(
        sample=hidden, temb=temb, encoder_hidden_states=ehs, extra=extra, batch_size=sample.shape[0],
        num_frames=extra.get("num_frames", sample.shape[1] if video else None) if video else None,
        forward_upsample_size=any(s % factor != 0 for s in sample.shape[-2:]))


def run_tail(unet: nn.Module, sample: torch.Tensor, head: HeadOutput) -> torch.Tensor:
    if getattr(unet, "conv_norm_out", None) is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    sample = unet.conv_out(sample)
    if head.num_frames is None:
        return sample
    if type(unet).__name__ == "UNetSpatioTemporalConditionModel":  # (batch, frames, channels, h, w)
        return sample.reshape(head.batch_size, head.num_frames, *sample.shape[1:])
    # (batch, channels, frames, h, w)
    return sample[None, :].reshape((-1, head.num_frames) + sample.shape[1:]).permute(0, 2, 1, 3, 4)


def _block_kwargs(block: nn.Module, hidden: torch.Tensor, temb: torch.Tensor, ehs: torch.Tensor | None,
                  extra: dict, **more) -> dict:
    """The arguments the monolithic forward would pass this block."""
    accepted = inspect.signature(block.forward).parameters
    kwargs = {"hidden_states": hidden, "temb": temb, **more}
    if getattr(block, "has_cross_attention", False):
        kwargs["encoder_hidden_states"] = ehs
    kwargs.update({k: v for k, v in extra.items() if k in accepted})
    return {k: v for k, v in kwargs.items() if k in accepted}


@dataclass
class LevelStash:
    """What a level keeps between the down pass and the up pass of one U-Net evaluation."""

    skips: list[torch.Tensor]  # the down block's input, then its resnets' outputs


class UNetLevels(nn.Module):
    """Levels [start, end) of a U-Net (level i < n: down block i + up block n-1-i; level n: mid)."""

    def __init__(self, unet: nn.Module, start: int, end: int):
        super().__init__()
        self.unet, self.start, self.end = unet, start, end
        self.n = len(unet.down_blocks)
        self.compute_device = torch.device("cpu")  # where the loaded blocks live (the rest stays on meta)
        self.compute_dtype = torch.float32  # what they compute in

    def _on_device(self, value):
        """Requests arrive on the CPU in the client's dtype; a CUDA server computes on its GPU, a bfloat16 server
        in bfloat16 (the handler casts outputs back)."""
        if isinstance(value, torch.Tensor):
            return value.to(self.compute_device, self.compute_dtype if value.is_floating_point() else value.dtype)
        if isinstance(value, dict):
            return {key: self._on_device(item) for key, item in value.items()}
        return value

    @classmethod
    def from_pretrained(cls, source: ModelSource, start: int, end: int, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> UNetLevels:
        """Load only the blocks of levels [start, end) from a pipeline directory (``unet/``) or a U-Net one."""
        config, subfolder = load_unet_config(source)
        unet = build_unet_skeleton(config)
        n = len(unet.down_blocks)
        if not 0 <= start < end <= n + 1:
            raise ValueError(f"levels {start}:{end} are outside the U-Net's 0:{n + 1}")
        check_pairing(unet)
        checkpoint = Checkpoint(source, subfolder=subfolder, stem="diffusion_pytorch_model")
        for level in range(start, end):
            paths = ["mid_block"] if level == n else [f"down_blocks.{level}", f"up_blocks.{n - 1 - level}"]
            for path in paths:
                module = unet.get_submodule(path).to(dtype).to_empty(device=device)
                module.load_state_dict(checkpoint.load_module(path, dtype), strict=True)
        levels = cls(unet, start, end).eval()
        levels.compute_device, levels.compute_dtype = torch.device(device), dtype
        levels.requires_grad_(False)
        latent_shift.install(levels)  # inactive unless a session asks for it
        levels.opened_files = sorted(checkpoint.opened_files)
        return levels

    def down(self, level: int, sample: torch.Tensor, temb: torch.Tensor, ehs: torch.Tensor | None,
             extra: dict) -> tuple[torch.Tensor, LevelStash | None]:
        sample, temb, ehs, extra = (self._on_device(x) for x in (sample, temb, ehs, extra))
        if level == self.n:
            mid = self.unet.mid_block
            return (sample if mid is None else mid(**_block_kwargs(mid, sample, temb, ehs, extra))), None
        block = self.unet.down_blocks[level]
        output, res_samples = block(**_block_kwargs(block, sample, temb, ehs, extra))
        # The downsampler's output, when there is one, is the next level's input (its first skip): not ours.
        resnet_outputs = list(res_samples[: len(block.resnets)])
        return output, LevelStash([sample, *resnet_outputs])

    def up(self, level: int, sample: torch.Tensor, temb: torch.Tensor, ehs: torch.Tensor | None, extra: dict,
           stash: LevelStash, upsample_size: tuple[int, int] | None) -> torch.Tensor:
        sample, temb, ehs, extra = (self._on_device(x) for x in (sample, temb, ehs, extra))
        skips = tuple(self._on_device(skip) for skip in stash.skips)
        block = self.unet.up_blocks[self.n - 1 - level]
        return block(**_block_kwargs(block, sample, temb, ehs, extra, res_hidden_states_tuple=skips,
                                     upsample_size=upsample_size))

    def upsample_size(self, level: int, input_sizes: list[tuple[int, int]], head_forwards: bool) -> tuple | None:
        """What the monolithic forward passes up block n-1-``level``: the input size of the level below, when the
        latent size is not a multiple of the upsampling factor (and never for the last up block)."""
        if level == 0 or not head_forwards:
            return None
        return tuple(input_sizes[level - 1])


def load_unet_config(source: ModelSource) -> tuple[dict, str | None]:
    """The U-Net's config and its subfolder: ``unet/`` of a pipeline directory, or the directory itself."""
    index = source.fetch("model_index.json", required=False)
    subfolder = "unet" if index is not None else None
    path = source.fetch(f"{subfolder}/config.json" if subfolder else "config.json")
    config = json.loads(path.read_text())
    unet_class(config)  # refuses unsupported classes early
    return config, subfolder


def is_unet_source(source: ModelSource) -> bool:
    try:
        load_unet_config(source)
        return True
    except (FileNotFoundError, NotImplementedError, json.JSONDecodeError):
        return False


def build_unet_skeleton(config: dict) -> nn.Module:
    """The U-Net's modules on the meta device: structure without memory."""
    cls = unet_class(config)
    with torch.device("meta"):
        return cls.from_config(config)


class _RemoteBlock(nn.Module):
    """Stands for a block computed elsewhere: holds no weights, and must never be called."""

    def __init__(self, block: nn.Module):
        super().__init__()
        # the monolithic forward decides which arguments a block gets from this flag
        self.has_cross_attention = getattr(block, "has_cross_attention", False)

    def forward(self, *args, **kwargs):
        raise RuntimeError("this U-Net block runs in the swarm, not here")


def up_factor(unet: nn.Module) -> int:
    """Total upsampling of the up path: latent sizes that are not a multiple need explicit upsample sizes."""
    stored = getattr(unet, "swarm_up_factor", None)
    return stored or 2 ** sum(1 for block in unet.up_blocks if getattr(block, "upsamplers", None))


def load_head_and_tail(source: ModelSource, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The U-Net's head and tail, loaded, for the client; its blocks are weightless stand-ins (servers run them)."""
    config, subfolder = load_unet_config(source)
    unet = build_unet_skeleton(config)
    check_pairing(unet)
    unet.swarm_up_factor = up_factor(unet)
    unet.swarm_num_levels = num_levels(unet)
    unet.down_blocks = nn.ModuleList(_RemoteBlock(block) for block in unet.down_blocks)
    unet.up_blocks = nn.ModuleList(_RemoteBlock(block) for block in unet.up_blocks)
    if unet.mid_block is not None:
        unet.mid_block = _RemoteBlock(unet.mid_block)
    checkpoint = Checkpoint(source, subfolder=subfolder, stem="diffusion_pytorch_model")
    for name, child in unet.named_children():
        if name in ("down_blocks", "up_blocks", "mid_block") or child is None:
            continue
        state = {k: v for k, v in checkpoint.load_prefix(name + ".", dtype).items()}
        materialized = child.to(dtype).to_empty(device="cpu")
        materialized.load_state_dict(state, strict=True)
        setattr(unet, name, materialized)
    for name, buffer in list(unet.named_buffers(recurse=False)):
        if buffer.is_meta:
            raise NotImplementedError(f"U-Net buffer {name} is not supported by the splitter")
    return unet.eval().requires_grad_(False)
