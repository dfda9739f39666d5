"""Latent-Shift: an image U-Net made a video U-Net by a parameter-free temporal shift.

In the residual branch of every ResNet block (the input of its first convolution), 1/8 of the channels take the
previous frame's values and 1/8 the next frame's, zero-padded at the ends. Nothing is learned, so image checkpoints
load unchanged; frames must sit together in the batch (video batches are folded as (batch * frames, ...)). A
single frame has no neighbours and is left as the image model computes it.

The shift is switched on per call (``active(frames)``) so that one set of hooks serves every request of a server.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput
from torch import nn

FOLD = 8  # 1/FOLD of the channels shift each way
_state = threading.local()


def temporal_shift(x: torch.Tensor, frames: int, fold: int = FOLD) -> torch.Tensor:
    """(batch * frames, channels, h, w): channels [0, c/fold) from the previous frame, [c/fold, 2c/fold) from the
    next one, zeros where there is none."""
    batch_frames, channels = x.shape[:2]
    video = x.view(batch_frames // frames, frames, channels, *x.shape[2:])
    k = channels // fold
    out = torch.zeros_like(video)
    out[:, 1:, :k] = video[:, :-1, :k]
    out[:, :-1, k : 2 * k] = video[:, 1:, k : 2 * k]
    out[:, :, 2 * k :] = video[:, :, 2 * k :]
    return out.view_as(x)


def _shift_input(conv: nn.Module, args: tuple) -> tuple | None:
    frames = getattr(_state, "frames", None)
    if frames is None or frames == 1:
        return None
    return (temporal_shift(args[0], frames), *args[1:])


def install(module: nn.Module) -> int:
    """Hook every ResNet block of ``module`` (inactive until ``active``); returns how many."""
    count = 0
    for block in module.modules():
        if isinstance(block, ResnetBlock2D) and not getattr(block.conv1, "_swarm_latent_shift", False):
            block.conv1.register_forward_pre_hook(_shift_input)
            block.conv1._swarm_latent_shift = True
            count += 1
    return count


@contextlib.contextmanager
def active(frames: int | None) -> Iterator[None]:
    """Shift along ``frames`` frames in this thread's calls inside the block (None: no shift)."""
    previous = getattr(_state, "frames", None)
    _state.frames = frames
    try:
        yield
    finally:
        _state.frames = previous


class LatentShiftUNet(nn.Module):
    """Wraps an image U-Net (local or ``RemoteUNet``) to take video latents (batch, channels, frames, h, w), as
    video pipelines call their U-Net."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.remote = hasattr(unet, "manager")  # a RemoteUNet: its servers apply the shift
        if not self.remote:
            install(unet)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                **kwargs):
        batch, channels, frames = sample.shape[:3]
        folded = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, *sample.shape[3:])
        ehs = encoder_hidden_states.repeat_interleave(frames, dim=0)
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 1 and timestep.shape[0] == batch:
            timestep = timestep.repeat_interleave(frames)
        if self.remote:
            out = self.unet(folded, timestep, ehs, return_dict=False, latent_shift_frames=frames, **kwargs)[0]
        else:
            with active(frames):
                out = self.unet(folded, timestep, ehs, return_dict=False, **kwargs)[0]
        out = out.reshape(batch, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        return UNet3DConditionOutput(sample=out) if return_dict else (out,)
