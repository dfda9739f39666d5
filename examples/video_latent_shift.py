"""Latent-Shift text-to-video through the swarm: an image model's U-Net made a video one, shifting features across
frames on the servers.

    python examples/video_latent_shift.py [SD_DIR] [--initial-peers MADDR ...]

``AutoDistributedPipeline.from_pretrained(SD_DIR, latent_shift=True)`` turns a Stable Diffusion directory into a
text-to-video pipeline (diffusers' ``TextToVideoSDPipeline``) whose U-Net shifts 1/8 of its ResNet features to the
previous frame and 1/8 to the next one (swarm/blocks/latent_shift.py). The example generates --frames frames through
the swarm, then the same with the local U-Net, and prints the video's shape and the largest difference (0 with
--compression none). Without a directory, a tiny random Stable Diffusion pipeline is written to a temporary one (its
frames are noise: the point is the swarm at work); without --initial-peers, two servers are started on 127.0.0.1
(on threads of this process) with the U-Net's levels split between them. --gif writes the video.

Duration on a 2-core machine with the tiny pipeline: ~30 s (measured). Processes: without --initial-peers two
servers, each with its p2pd daemon; the client's p2pd; all stopped when it ends, also on Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

from swarm import AutoDistributedPipeline  # noqa: E402
from swarm.client.pipeline import latent_shift_pipeline  # noqa: E402
from swarm.hub.tiny_diffusion import save_tiny_sd  # noqa: E402
from swarm.local_swarm import peers_or_local_swarm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a Stable Diffusion 1.x/2.x directory (default: a tiny random one)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--prompt", default="a red ball bouncing on a beach")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", default="none", help="the client's codec (none: output equal to local)")
    parser.add_argument("--gif", help="write the video here")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        model = args.model
        if model is None:
            model = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-sd-"))) / "pipeline"
            save_tiny_sd(model)
            print(f"Wrote a tiny random Stable Diffusion pipeline to {model}", flush=True)
        started = time.monotonic()
        # Servers on threads of this process: no Python start-up each, so the example stays short.
        peers = peers_or_local_swarm(stack, model, args.initial_peers, in_process=True)
        print(f"Swarm ready (+{time.monotonic() - started:.1f} s)", flush=True)
        pipe = AutoDistributedPipeline.from_pretrained(model, initial_peers=peers, compression=args.compression,
                                                       latent_shift=True)
        stack.callback(pipe.unet.shutdown)

        def generate(pipeline):
            pipeline.set_progress_bar_config(disable=True)
            return pipeline(args.prompt, num_frames=args.frames, height=args.size, width=args.size,
                            num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed)).frames

        started = time.monotonic()
        video = generate(pipe)
        print(f"Generated {args.frames} frames through the swarm in {time.monotonic() - started:.1f} s; now "
              "locally...", flush=True)
        reference = generate(latent_shift_pipeline(DiffusionPipeline.from_pretrained(model)))
        print(f"output shape: {tuple(video.shape)}")
        print(f"max difference from the local run: {np.abs(video - reference).max():.3g}")
        if args.gif:
            from PIL import Image

            frames = [Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in video[0]]
            frames[0].save(args.gif, save_all=True, append_images=frames[1:], duration=125, loop=0)
            print(f"Wrote {args.gif}")


if __name__ == "__main__":
    main()
