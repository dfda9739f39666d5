"""The whole training recipe in one call: MUGEN-like clips -> a 3D VQ autoencoder -> code sequences -> a token
transformer, saved as ``DIR/vq`` (``load_vqvae``) and ``DIR/transformer`` (a transformers checkpoint that
``python -m swarm.server DIR/transformer`` serves), with the figures in ``DIR/stats.json``.

``python -m swarm.video train DIR`` runs it from the command line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from swarm.video.mugen import VOCABULARY, MugenLikeClips
from swarm.video.transformer import TokenLayout, train_transformer
from swarm.video.vqvae import VQConfig, save_vqvae, train_vqvae


def train_long_video_models(directory: str | Path, *, clips: int = 256, frames: int = 16, size: int = 32,
                            vq_steps: int = 400, vq_config: VQConfig | None = None, steps: int = 600,
                            hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0,
                            log: Callable[[str], None] | None = None) -> dict:
    """Train both models on ``clips`` clips of ``frames`` frames (``size`` pixels) and save them under
    ``directory``. Returns (and writes to ``stats.json``) the VQ's held-out PSNR and per-frame error, its codebook
    usage, the transformer's loss before and after, and the time each part took."""
    directory = Path(directory)
    began = time.perf_counter()
    data = MugenLikeClips(clips, frames=frames, size=size, seed=seed)
    vq, vq_stats = train_vqvae(data, vq_config, steps=vq_steps, seed=seed, log=log)
    save_vqvae(vq, directory / "vq")
    items = [data[i] for i in range(len(data))]
    texts = [item["text_ids"] for item in items]
    videos = torch.stack([item["video"] for item in items])
    with torch.no_grad():
        codes = torch.cat([vq.encode(videos[i: i + 16]) for i in range(0, len(videos), 16)])
    code_frames, height, width = codes.shape[1:]
    layout = TokenLayout(text_vocab=len(VOCABULARY), codebook=vq.config.codebook_size,
                         text_length=max(len(t) for t in texts), frame_height=height, frame_width=width,
                         frames=code_frames)
    sequences = torch.stack([layout.sequence(text, grid) for text, grid in zip(texts, codes, strict=True)])
    model, lm_stats = train_transformer(sequences, layout, hidden=hidden, layers=layers, heads=heads, steps=steps,
                                        seed=seed, log=log)
    model.save_pretrained(directory / "transformer")
    stats = {"clips": clips, "frames": frames, "size": size, "seed": seed, "layout": layout.to_dict(), "vq": vq_stats,
             "transformer": lm_stats, "seconds": time.perf_counter() - began}
    (directory / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
