"""A small 3D VQ autoencoder (VQ-VAE) for short clips: video -> a (t, h, w) grid of codebook indices -> video.

The encoder downsamples time by ``time_down`` and space by ``space_down`` in one strided Conv3d whose kernel equals
its stride (each code's pixels at once: cheap on CPU, no overlapping windows at full resolution), then mixes
neighbouring codes with residual 3x3x3 convs at the code resolution, where they cost little. The decoder mirrors it
and ends with a transposed Conv3d of the same kernel and stride. Quantization is to the nearest codebook vector with
a straight-through gradient and a commitment loss; the codebook follows its assigned encoder outputs by EMA (k-means
style, no codebook loss), starts from encoder outputs, and any code unused for ``restart_after`` steps is restarted
at a random encoder output, so the whole codebook ends up in use.

Training starts from the principal components of the data's patches (``VQVAE3D.initialize``): on these flat-colour
clips plain Adam needs thousands of steps to find even the linear autoencoder, and a CPU budget allows hundreds.

The API's video layout is (B, T, C, H, W) in [0, 1]; Conv3d wants (B, C, T, H, W), so it is permuted inside.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "VQConfig",
    "VQVAE3D",
    "frame_errors",
    "load_vqvae",
    "psnr",
    "save_vqvae",
    "train_vqvae",
]

CONFIG_FILE = "vqvae_config.json"
WEIGHTS_FILE = "vqvae.safetensors"


@dataclass
class VQConfig:
    """Shape and training knobs of a VQVAE3D; saved as JSON beside the weights. The defaults turn a 16x32x32 clip
    into 8x8x8 codes."""

    channels: int = 3
    hidden: int = 64  # width of the residual stream at the code resolution
    codebook_size: int = 128
    code_dim: int = 32
    time_down: int = 2  # frames per code along time
    space_down: int = 4  # pixels per code along height and width
    res_blocks: int = 2  # residual blocks at the code resolution, in the encoder and in the decoder
    beta: float = 0.25  # weight of the commitment loss
    decay: float = 0.95  # EMA decay of the codebook: short runs need it to follow the encoder quickly
    restart_after: int = 10  # steps a code may go unused in training before it is moved to an encoder output

    @property
    def patch(self) -> tuple[int, int, int]:
        """(t, h, w) of the pixels behind one code."""
        return (self.time_down, self.space_down, self.space_down)


class _Residual(nn.Module):
    """x + 1x1(act(3x3x3(act(x)))), the 1x1 zero-initialized: each block starts as the identity, so the PCA start
    (``VQVAE3D.initialize``) is what the whole network computes before training."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(width, width, 3, padding=1)
        self.mix = nn.Conv3d(width, width, 1)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(F.silu(self.conv(F.silu(x))))


class _Codebook(nn.Module):
    """Nearest-vector quantizer whose vectors are EMA means of the encoder outputs assigned to them."""

    def __init__(self, size: int, dim: int, decay: float, restart_after: int) -> None:
        super().__init__()
        self.decay, self.restart_after = decay, restart_after
        self.register_buffer("embed", torch.randn(size, dim))
        self.register_buffer("cluster_size", torch.ones(size))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("unused_steps", torch.zeros(size, dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook vector for each row of z (N, dim)."""
        distances = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.embed.t() + self.embed.pow(2).sum(1)[None, :]
        return distances.argmin(dim=1)

    @torch.no_grad()
    def _sample(self, z: torch.Tensor, n: int) -> torch.Tensor:
        if n > z.shape[0]:
            picks = torch.randint(0, z.shape[0], (n,), device=z.device)
        else:
            picks = torch.randperm(z.shape[0], device=z.device)[:n]
        return z[picks] + 1e-3 * torch.randn(n, z.shape[1], device=z.device)  # jitter: repeated rows stay apart

    @torch.no_grad()
    def _update(self, z: torch.Tensor, index: torch.Tensor) -> None:
        size = self.embed.shape[0]
        counts = torch.bincount(index, minlength=size).to(z.dtype)
        sums = torch.zeros_like(self.embed).index_add_(0, index, z)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (total + size * 1e-5) * total  # no division by an empty cluster
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = self.unused_steps >= self.restart_after
        if dead.any():
            fresh = self._sample(z, int(dead.sum()))
            self.embed[dead] = fresh
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0
            self.unused_steps[dead] = 0

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (N, dim) -> (quantized with a straight-through gradient, indices, commitment loss)."""
        if self.training and not bool(self.initialized):
            with torch.no_grad():  # start where the data is, not at random points no output is near
                self.embed.copy_(self._sample(z.detach(), self.embed.shape[0]))
                self.embed_sum.copy_(self.embed)
                self.initialized.fill_(True)
        index = self.nearest(z.detach())
        quantized = self.embed[index]
        if self.training:
            self._update(z.detach(), index)
        commitment = F.mse_loss(z, quantized.detach())
        return z + (quantized - z).detach(), index, commitment


class VQVAE3D(nn.Module):
    """Video (B, T, C, H, W) in [0, 1] <-> codes (B, T / time_down, H / space_down, W / space_down).

    Encoder: a Conv3d with kernel = stride = (time_down, space_down, space_down) (each code's pixels, at once),
    residual 3x3x3 blocks, a 1x1 down to ``code_dim``. Decoder: a 3x3x3 conv up to ``hidden``, residual blocks, a
    transposed Conv3d with kernel = stride back to pixels. The residual stream has no nonlinearity outside the blocks,
    so the network can start as a linear (PCA) autoencoder and learn the rest."""

    def __init__(self, config: VQConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or VQConfig()
        self.encoder = nn.Sequential(
            nn.Conv3d(c.channels, c.hidden, c.patch, stride=c.patch),
            *[_Residual(c.hidden) for _ in range(c.res_blocks)],
            nn.Conv3d(c.hidden, c.code_dim, 1),
        )
        self.codebook = _Codebook(c.codebook_size, c.code_dim, c.decay, c.restart_after)
        self.decoder = nn.Sequential(
            nn.Conv3d(c.code_dim, c.hidden, 3, padding=1),
            *[_Residual(c.hidden) for _ in range(c.res_blocks)],
            nn.ConvTranspose3d(c.hidden, c.channels, c.patch, stride=c.patch),
        )

    @torch.no_grad()
    def initialize(self, video: torch.Tensor) -> None:
        """Data-dependent start: the patch convs become the principal directions of ``video``'s patches (the
        encoder keeps the first ``code_dim``, the decoder maps them back), so training starts from the best linear
        autoencoder of that size instead of spending hundreds of steps finding it. Call before training."""
        c = self.config
        x = self._prepare(video)
        b, ch, t, h, w = x.shape
        pt, ph, pw = c.patch
        patches = x.reshape(b, ch, t // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(-1, ch * pt * ph * pw).double()  # rows ordered as the conv weights: (c, t, h, w)
        # Not centred: the first direction carries the mean patch, so no per-position bias is needed.
        _, vectors = torch.linalg.eigh(patches.t() @ patches)
        basis = vectors.flip(1)[:, : c.hidden].t().float()  # (k, patch size), strongest first
        k = basis.shape[0]
        embed, unembed = self.encoder[0], self.decoder[-1]
        embed.weight.zero_()
        embed.bias.zero_()
        embed.weight[:k] = basis.reshape(k, ch, pt, ph, pw)
        unembed.weight.zero_()
        unembed.weight[:k] = basis.reshape(k, ch, pt, ph, pw) / 2  # inputs were scaled to [-1, 1]
        unembed.bias.fill_(0.5)
        keep = min(k, c.code_dim)
        down, up = self.encoder[-1], self.decoder[0]
        for conv in (down, up):
            conv.weight.zero_()
            conv.bias.zero_()
        down.weight[:keep, :keep, 0, 0, 0] = torch.eye(keep)
        up.weight[:keep, :keep, 1, 1, 1] = torch.eye(keep)

    def _check(self, video: torch.Tensor) -> None:
        c = self.config
        if video.dim() != 5 or video.shape[2] != c.channels:
            raise ValueError(f"expected video (B, T, {c.channels}, H, W), got {tuple(video.shape)}")
        _, frames, _, height, width = video.shape
        if frames % c.time_down or height % c.space_down or width % c.space_down:
            raise ValueError(
                f"frames must be a multiple of {c.time_down} and height/width of {c.space_down}, got "
                f"{frames}x{height}x{width}"
            )

    def _prepare(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) in [0, 1] -> (B, C, T, H, W) in [-1, 1]: Conv3d's layout, centred inputs."""
        self._check(video)
        return video.permute(0, 2, 1, 3, 4) * 2 - 1

    def _latents(self, video: torch.Tensor) -> torch.Tensor:
        """Encoder outputs (B, code_dim, t, h, w)."""
        return self.encoder(self._prepare(video))

    def _quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, d, t, h, w = latents.shape
        flat = latents.permute(0, 2, 3, 4, 1).reshape(-1, d)
        quantized, index, commitment = self.codebook(flat)
        quantized = quantized.reshape(b, t, h, w, d).permute(0, 4, 1, 2, 3)
        return quantized, index.reshape(b, t, h, w), commitment

    def _decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized).permute(0, 2, 1, 3, 4)  # back to (B, T, C, H, W)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Codes (B, t, h, w) of ``video`` (B, T, C, H, W); the codebook is left as it is."""
        latents = self._latents(video)
        b, d, t, h, w = latents.shape
        return self.codebook.nearest(latents.permute(0, 2, 3, 4, 1).reshape(-1, d)).reshape(b, t, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Video (B, T, C, H, W) in [0, 1] from codes (B, t, h, w)."""
        quantized = self.codebook.embed[codes].permute(0, 4, 1, 2, 3)
        return self._decode_latents(quantized).clamp(0, 1)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, loss, codes). The reconstruction is not clamped, so the loss has gradients everywhere;
        in training mode the codebook is updated (EMA, restarts)."""
        quantized, codes, commitment = self._quantize(self._latents(video))
        reconstruction = self._decode_latents(quantized)
        loss = F.mse_loss(reconstruction, video) + self.config.beta * commitment
        return reconstruction, loss, codes


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two tensors with values in [0, 1] (inf if equal)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def frame_errors(video: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Mean squared error per frame, (T,), of (T, C, H, W) or (B, T, C, H, W) videos (batch averaged)."""
    if video.shape != reconstruction.shape or video.dim() not in (4, 5):
        shapes = f"{tuple(video.shape)}, {tuple(reconstruction.shape)}"
        raise ValueError(f"expected two (T, C, H, W) or (B, T, C, H, W) videos of one shape, got {shapes}")
    error = (video.float() - reconstruction.float()).pow(2)
    dims = (1, 2, 3) if video.dim() == 4 else (0, 2, 3, 4)
    return error.mean(dim=dims)


def _videos(items: list) -> torch.Tensor:
    """Collate the videos only: texts, events and audio differ in length from clip to clip."""
    return torch.stack([item["video"] if isinstance(item, dict) else item for item in items])


def _split(n: int) -> tuple[list[int], list[int]]:
    """Training and held-out indices: the last eighth is held out when there are enough clips for both."""
    held = min(n // 8, 64) if n >= 16 else 0
    train = list(range(n - held))
    return train, (list(range(n - held, n)) or train)


@torch.no_grad()
def _evaluate(model: VQVAE3D, dataset: Dataset, indices: list[int], batch_size: int) -> tuple[float, int, list[float]]:
    """PSNR over ``indices``, how many distinct codes they use, and their mean squared error per frame."""
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=_videos)
    summed, clips, used = [], 0, torch.zeros(model.config.codebook_size, dtype=torch.bool)
    for video in loader:
        codes = model.encode(video)
        summed.append(frame_errors(video, model.decode(codes)) * len(video))
        clips += len(video)
        used[codes.unique()] = True
    per_frame = torch.stack(summed).sum(0) / clips
    mse = float(per_frame.mean())  # (every frame has as many pixels)
    return (math.inf if mse == 0 else 10 * math.log10(1 / mse)), int(used.sum()), per_frame.tolist()


def train_vqvae(
    dataset: Dataset,
    config: VQConfig | None = None,
    steps: int = 500,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[VQVAE3D, dict]:
    """Train a VQVAE3D on the ``"video"`` of each item (or the item itself, if a tensor) and evaluate it.

    Deterministic for a seed (model init, shuffling, codebook restarts). The last eighth of the dataset (up to 64
    clips; nothing below 16 clips) is held out for the PSNR and codebook usage in the returned stats:
    ``{"psnr", "codebook_used", "frame_mse" (per frame), "steps", "seconds", "loss" (mean of the last 20 steps),
    "losses" (per step)}``.
    The model comes back in eval mode.
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = VQVAE3D(config)
    train, held_out = _split(len(dataset))
    batch_size = min(batch_size, len(train))
    loader = DataLoader(
        Subset(dataset, train),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=_videos,
        generator=torch.Generator().manual_seed(seed),
    )
    model.initialize(_videos([dataset[i] for i in train[:32]]))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, min(20, steps // 10))

    def factor(step: int) -> float:  # linear warm-up, then a cosine down to a tenth
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        for video in loader:
            _, loss, _ = model(video)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step = len(losses)
            if log is not None and (step % 50 == 0 or step == steps):
                log(f"vqvae step {step}/{steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.5f}")
            if step >= steps:
                break
    model.eval()
    value, used, per_frame = _evaluate(model, dataset, held_out, batch_size)
    stats = {
        "psnr": value,
        "codebook_used": used,
        "frame_mse": per_frame,
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "loss": sum(losses[-20:]) / len(losses[-20:]) if losses else math.nan,
        "losses": losses,
    }
    if log is not None:
        log(f"vqvae: {value:.2f} dB on {len(held_out)} clips, {used}/{model.config.codebook_size} codes used")
    return model, stats


def save_vqvae(model: VQVAE3D, directory: str | Path) -> None:
    """Config as JSON and weights (codebook included) as safetensors: nothing pickled."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
    save_file({name: t.detach().contiguous() for name, t in model.state_dict().items()}, directory / WEIGHTS_FILE)


def load_vqvae(directory: str | Path) -> VQVAE3D:
    """The model ``save_vqvae`` wrote, in eval mode."""
    directory = Path(directory)
    model = VQVAE3D(VQConfig(**json.loads((directory / CONFIG_FILE).read_text())))
    model.load_state_dict(load_file(directory / WEIGHTS_FILE))
    return model.eval()
