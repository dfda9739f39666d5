"""A quality figure that can be computed here: does a clip move like the data does?

A small 3D-convolutional classifier learns to tell real clips from the same clips with their frames shuffled in
time (the frames alone are real; only their order is wrong). Applied to windows of a generated clip, the share it
judges "in order" says whether generation stays on the data's manifold of motion, also far past the training
length; the same windows shuffled are the control.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset


class OrderClassifier(nn.Module):
    """(batch, frames, 3, H, W) -> a logit per clip: positive for frames in their real order."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(6, width, 3, stride=(1, 2, 2), padding=1), nn.SiLU(),
            nn.Conv3d(width, width * 2, 3, stride=(2, 2, 2), padding=1), nn.SiLU(),
            nn.Conv3d(width * 2, width * 2, 3, stride=(2, 2, 2), padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(width * 2, 1))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # frame differences carry the motion: a shuffled clip's are large and erratic
        moving = torch.cat([torch.zeros_like(video[:, :1]), video[:, 1:] - video[:, :-1]], dim=1)
        return self.net(torch.cat([video, moving], dim=2).permute(0, 2, 1, 3, 4)).squeeze(-1)


def shuffle_frames(video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The clip (frames, ...) with its frames in a random order other than the original one."""
    frames = video.shape[0]
    order = torch.randperm(frames, generator=generator)
    while frames > 1 and torch.equal(order, torch.arange(frames)):
        order = torch.randperm(frames, generator=generator)
    return video[order]


def train_order_classifier(dataset: Dataset, steps: int = 300, batch_size: int = 16, lr: float = 2e-3,
                           seed: int = 0) -> tuple[OrderClassifier, dict]:
    """Train on the dataset's clips (the last fifth held out) against their shuffled copies. Returns the model in
    eval mode and ``{"accuracy": held-out accuracy, "steps", "seconds"}``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    videos = torch.stack([dataset[i]["video"] for i in range(len(dataset))])
    held = max(1, len(videos) // 5)
    train, test = videos[:-held], videos[-held:]
    model = OrderClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    began = time.perf_counter()
    for _ in range(steps):
        real = train[torch.randint(len(train), (batch_size // 2,), generator=generator)]
        fake = torch.stack([shuffle_frames(clip, generator) for clip in real])
        logits = model(torch.cat([real, fake]))
        labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        fake = torch.stack([shuffle_frames(clip, generator) for clip in test])
        correct = int((model(test) > 0).sum()) + int((model(fake) <= 0).sum())
    return model, {"accuracy": correct / (2 * len(test)), "steps": steps, "seconds": time.perf_counter() - began}


@torch.no_grad()
def in_order_share(model: OrderClassifier, video: torch.Tensor, window: int, step: int | None = None) -> float:
    """The share of ``window``-frame windows (every ``step`` frames) of a clip (frames, 3, H, W) that the classifier
    judges in their real order."""
    step = step or max(1, window // 2)
    starts = range(0, video.shape[0] - window + 1, step)
    windows = torch.stack([video[start: start + window] for start in starts])
    return float((model(windows) > 0).float().mean())
