"""Make-A-Video-style frame interpolation through the swarm: key frames in, the frames between them generated.

    python examples/video_interpolation.py [TEXT_TO_VIDEO_DIR] [--initial-peers MADDR ...]

Generates --keys key frames with the text-to-video pipeline, places them --every frames apart and generates the
frames between them with masked known-frame sampling (swarm/video/interpolation.py), the U-Net on the servers;
then runs the same interpolation with the local U-Net and prints the video's shape and the largest difference
(0 with --compression none). Without a directory, a tiny random text-to-video pipeline is written to a temporary
one (its frames are noise: the point is the swarm at work); without --initial-peers, two servers are started on
127.0.0.1 (on threads of this process) with the U-Net's levels split between them. --gif writes the interpolated video.

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
from swarm.hub.tiny_diffusion import save_tiny_text_to_video  # noqa: E402
from swarm.local_swarm import peers_or_local_swarm  # noqa: E402
from swarm.video.interpolation import interpolate_frames  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a text-to-video pipeline directory (default: a tiny random one)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--prompt", default="a red ball bouncing on a beach")
    parser.add_argument("--keys", type=int, default=2, help="key frames to generate")
    parser.add_argument("--every", type=int, default=3, help="key frames are this many frames apart")
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", default="none", help="the client's codec (none: output equal to local)")
    parser.add_argument("--gif", help="write the interpolated video here")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        model = args.model
        if model is None:
            model = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-video-"))) / "pipeline"
            save_tiny_text_to_video(model)
            print(f"Wrote a tiny random text-to-video pipeline to {model}", flush=True)
        started = time.monotonic()
        # Servers on threads of this process: no Python start-up each, so the example stays short.
        peers = peers_or_local_swarm(stack, model, args.initial_peers, in_process=True)
        print(f"Swarm ready (+{time.monotonic() - started:.1f} s)", flush=True)
        pipe = AutoDistributedPipeline.from_pretrained(model, initial_peers=peers, compression=args.compression)
        stack.callback(pipe.unet.shutdown)
        pipe.set_progress_bar_config(disable=True)

        keys = pipe(args.prompt, num_frames=args.keys, height=args.size, width=args.size,
                    num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed)).frames[0]
        known = {i * args.every: frame for i, frame in enumerate(keys)}
        num_frames = (args.keys - 1) * args.every + 1
        print(f"Key frames at {sorted(known)} of {num_frames}; generating the others through the swarm...",
              flush=True)

        def interpolate(pipeline):
            return interpolate_frames(pipeline, args.prompt, num_frames, known_frames=known,
                                      num_inference_steps=args.steps,
                                      generator=torch.Generator().manual_seed(args.seed + 1))

        started = time.monotonic()
        video = interpolate(pipe)
        print(f"Interpolated through the swarm in {time.monotonic() - started:.1f} s; now locally...", flush=True)
        local = DiffusionPipeline.from_pretrained(model)
        local.set_progress_bar_config(disable=True)
        reference = interpolate(local)
        print(f"output shape: {tuple(video.frames.shape)}")
        print(f"max difference from the local run: {np.abs(video.frames - reference.frames).max():.3g}")
        if args.gif:
            from PIL import Image

            frames = [Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in video.frames[0]]
            frames[0].save(args.gif, save_all=True, append_images=frames[1:], duration=125, loop=0)
            print(f"Wrote {args.gif}")


if __name__ == "__main__":
    main()
