"""ConsistI2V-style image-to-video through the swarm: a text-to-video U-Net on servers, first-frame attention applied
by them for this generation only.

    python examples/video_consisti2v.py [VIDEO_DIR] [--initial-peers MADDR ...]

``swarm.video.consisti2v.consisti2v(pipe, image, prompt, ...)`` animates an image with a text-to-video pipeline
(diffusers' ``TextToVideoSDPipeline``): the first frame is the image (noised to each step's level), every spatial
self-attention layer also attends to the first frame (``FirstFrameAttnProcessor``, set with diffusers'
``set_attn_processor`` and run on the servers), and the initial noise takes its low frequencies from the image
(FrameInit). The example runs it through the swarm, then locally, and prints the video's shape and the largest
difference (0 with --compression none). Without a directory, a tiny random text-to-video pipeline is written to a
temporary one (its frames are noise: the point is the swarm at work); without --initial-peers, two servers are
started on 127.0.0.1 (on threads of this process). --image takes a picture file (default: a gradient).

Duration on a 2-core machine with the tiny pipeline: ~25 s (measured). Processes: without --initial-peers two
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

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

from swarm import AutoDistributedPipeline  # noqa: E402
from swarm.hub.tiny_diffusion import save_tiny_text_to_video  # noqa: E402
from swarm.local_swarm import peers_or_local_swarm  # noqa: E402
from swarm.video.consisti2v import consisti2v  # noqa: E402


def load_image(path: str | None, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: the file's picture, or a colour gradient."""
    if path is None:
        ramp = torch.linspace(-1, 1, size)
        return torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                            -ramp[None, :].expand(size, size)])[None]
    import numpy as np
    from PIL import Image

    picture = np.asarray(Image.open(path).convert("RGB").resize((size, size)), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(picture).permute(2, 0, 1)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a text-to-video pipeline directory (default: a tiny random one)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--image", help="the first frame (default: a gradient)")
    parser.add_argument("--prompt", default="a boat drifting on a lake")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", default="none", help="the client's codec (none: output equal to local)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        model = args.model
        if model is None:
            model = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny-video-"))) / "pipeline"
            save_tiny_text_to_video(model)
            print(f"Wrote a tiny random text-to-video pipeline to {model}", flush=True)
        started = time.monotonic()
        peers = peers_or_local_swarm(stack, model, args.initial_peers, in_process=True)
        print(f"Swarm ready (+{time.monotonic() - started:.1f} s)", flush=True)
        pipe = AutoDistributedPipeline.from_pretrained(model, initial_peers=peers, compression=args.compression)
        stack.callback(pipe.unet.shutdown)
        image = load_image(args.image, args.size)

        def generate(pipeline) -> torch.Tensor:
            return consisti2v(pipeline, image, args.prompt, num_frames=args.frames, num_inference_steps=args.steps,
                              generator=torch.Generator().manual_seed(args.seed)).frames

        started = time.monotonic()
        video = generate(pipe)
        print(f"Generated {args.frames} frames through the swarm in {time.monotonic() - started:.1f} s; now "
              "locally...", flush=True)
        reference = generate(DiffusionPipeline.from_pretrained(model))
        print(f"output shape: {tuple(video.shape)}")
        print(f"max difference from the local run: {(video - reference).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
