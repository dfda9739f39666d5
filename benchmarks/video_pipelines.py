"""Denoising step time of each video workload through the swarm vs the same workload run locally, side by side.

    python benchmarks/video_pipelines.py [--compression none] [--threads N] [--only NAME ...] [--models DIR]
    python benchmarks/video_pipelines.py --tiny     # tiny pipelines: a smoke run, its figures mean little

Workloads (random weights, float32, batch 1, classifier-free guidance on where the workload uses it):

* ``latent_shift``: Latent-Shift text-to-video from a Stable Diffusion directory
  (``AutoDistributedPipeline.from_pretrained(SD_DIR, latent_shift=True)`` vs ``latent_shift_pipeline`` of the local
  pipeline), the U-Net a ``UNet2DConditionModel`` taking the frames folded in its batch;
* ``interpolation``: Make-A-Video-style frame interpolation (``swarm.video.interpolation.interpolate_frames``, first
  and last frames known) with a ``TextToVideoSDPipeline``;
* ``consisti2v``: ConsistI2V image-to-video (``swarm.video.consisti2v.consisti2v``: first-frame attention on the
  servers, FrameInit) with the same text-to-video pipeline;
* ``anyv2v``: AnyV2V video editing (``swarm.video.anyv2v.anyv2v``: DDIM inversion capturing features on the servers,
  then generation injecting them) with an ``I2VGenXLPipeline``.

The "step time" is the mean wall time of one call of ``pipe.unet`` (forward pre/post hooks on it, for a local U-Net
as for a ``RemoteUNet`` or the ``LatentShiftUNet`` around either), so it leaves out text/image encoding, the
scheduler and the VAE: it is what the swarm replaces. Per worker: one warm-up call, then ``--runs`` (3) timed calls;
the figure is the median over the calls of each call's mean step time (the first step of a call opens the swarm
session, and is counted). ``ratio`` is swarm / local; ``step_ratio_max`` is the worst ratio. The same without each
call's first step (``steady_step_ratio_max``): what every further step of a longer generation costs, a real one
having 25-50 steps where this one has 4.

Sizes. Bench (default): U-Nets with block_out_channels (128, 256, 512) (three down blocks: four levels, served as
0:2 and 2:4), 2 layers per block, 64x64 px (8x8 latents), 4 frames, 4 steps; the text and image encoders and the VAE
are the tiny ones of ``swarm.hub.tiny_diffusion`` (cross-attention width 32). One U-Net evaluation takes ~0.25 s
(Latent-Shift's 2-D U-Net, 8 frame-images with guidance) and ~0.4-0.7 s (the video U-Nets) on a 2-core machine
(measured). ``--tiny``: the tiny pipelines of ``swarm.hub.tiny_diffusion``, 3 frames, 2 steps.

Threads: every process uses torch's default (the number of cores) unless ``--threads N``. On a machine that other
work also loads, two threads per process made the figures erratic (a tiny local U-Net step from 60 ms to 3 s, call
to call), one thread did not: use ``--threads 1`` there. The load average is printed at the start and the end.

Duration on a 2-core machine (measured): bench size 260 s, of which ~13 s write the pipelines (1.2 GB in a temporary
directory, removed at the end; ``--models DIR`` keeps them for the next run) and ~27 s start each pair of servers;
--tiny 210 s on a quiet machine, 330 s while other work loaded it (mostly the start-ups of 8 workers and 6 servers).

Processes: the pipelines are written by this process, which imports no swarm client and runs no model. Each
measurement runs in a fresh process of this script (``--worker local|swarm --pipeline NAME --dir DIR [--peers
MADDR]``): a live swarm client slows other torch work in its process, so local and swarm never share one (see
shared/notes/measuring.md). Per pipeline directory (interpolation and ConsistI2V share the text-to-video one), in
order: the local workers; two U-Net servers (``python -m swarm.server``, each with its p2pd daemon; AnyV2V's with
``--max-diffusion-sessions 64``, as it keeps features on them) splitting the levels in half; the swarm workers (each
with its client p2pd); then the servers are stopped before the next directory's. All are stopped when the script
ends, also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP. ``SWARM_CACHE``, unless set, points into the models
directory, so the servers write nothing under ``~/.cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PIPELINES = ("latent_shift", "interpolation", "consisti2v", "anyv2v")
KIND = {"latent_shift": "sd", "interpolation": "text_to_video", "consisti2v": "text_to_video", "anyv2v": "i2vgenxl"}
PROMPT = "a red ball bouncing on a beach"
RESULT = "RESULT "
BENCH_CHANNELS = (128, 256, 512)


# ------------------------------------------------------------------------------------------------ the pipelines


def _bench_unet_config(three_d: bool, channels: tuple[int, ...], sample_size: int) -> dict:
    """The tiny configs' layout (cross-attention width, heads, norm groups), with more and wider levels: every down
    block but the deepest has cross-attention, like SD's."""
    from swarm.hub.tiny_diffusion import HIDDEN

    suffix = "3D" if three_d else "2D"
    down = tuple(f"CrossAttnDownBlock{suffix}" for _ in channels[:-1]) + (f"DownBlock{suffix}",)
    up = (f"UpBlock{suffix}",) + tuple(f"CrossAttnUpBlock{suffix}" for _ in channels[:-1])
    return dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=channels, down_block_types=down, up_block_types=up, cross_attention_dim=HIDDEN,
                attention_head_dim=8, norm_num_groups=32)


def save_bench_pipeline(kind: str, directory: Path, channels: tuple[int, ...], size: int, seed: int = 0) -> None:
    """The tiny pipeline of ``kind`` (same component classes, same encoders, VAE and scheduler) with a bigger U-Net."""
    from diffusers import (
        I2VGenXLPipeline,
        I2VGenXLUNet,
        StableDiffusionPipeline,
        TextToVideoSDPipeline,
        UNet2DConditionModel,
        UNet3DConditionModel,
    )

    from swarm.hub.tiny_diffusion import (
        VAE_SCALE,
        build_random,
        tiny_clip_image_processor,
        tiny_clip_tokenizer,
        tiny_ddim_scheduler,
        tiny_image_encoder,
        tiny_text_encoder,
        tiny_vae,
    )

    common = dict(vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(seed + 2), tokenizer=tiny_clip_tokenizer(),
                  scheduler=tiny_ddim_scheduler())
    sample_size = size // VAE_SCALE
    if kind == "sd":
        unet = build_random(UNet2DConditionModel, _bench_unet_config(False, channels, sample_size), seed)
        pipe = StableDiffusionPipeline(**common, unet=unet, safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
    elif kind == "text_to_video":
        unet = build_random(UNet3DConditionModel, _bench_unet_config(True, channels, sample_size), seed)
        pipe = TextToVideoSDPipeline(**common, unet=unet)
    else:
        unet = build_random(I2VGenXLUNet, _bench_unet_config(True, channels, sample_size), seed)
        pipe = I2VGenXLPipeline(**common, unet=unet, image_encoder=tiny_image_encoder(seed + 3),
                                feature_extractor=tiny_clip_image_processor())
    pipe.save_pretrained(directory)


def write_pipelines(root: Path, kinds: set[str], tiny: bool) -> dict[str, Path]:
    """Each kind's pipeline directory under ``root``, written unless there already (``--models`` reuses them)."""
    from swarm.hub.tiny_diffusion import save_tiny_i2vgenxl, save_tiny_sd, save_tiny_text_to_video

    savers = {"sd": save_tiny_sd, "text_to_video": save_tiny_text_to_video, "i2vgenxl": save_tiny_i2vgenxl}
    paths = {}
    for kind in sorted(kinds):
        path = root / f"{'tiny' if tiny else 'bench'}-{kind}"
        if not (path / "model_index.json").exists():
            started = time.perf_counter()
            if tiny:
                savers[kind](path)
            else:
                save_bench_pipeline(kind, path, BENCH_CHANNELS, 64)
            print(f"wrote {path} in {time.perf_counter() - started:.1f} s", flush=True)
        paths[kind] = path
    return paths


# ---------------------------------------------------------------------------------------------------- workers


def _load(name: str, directory: str, peers: list[str] | None, compression: str):
    """The pipeline a workload runs: local (``peers`` None) or with its U-Net in the swarm."""
    from diffusers import DiffusionPipeline

    from swarm.client.pipeline import AutoDistributedPipeline, i2vgenxl_pipeline, latent_shift_pipeline

    if peers is not None:
        return AutoDistributedPipeline.from_pretrained(directory, initial_peers=peers, compression=compression,
                                                       latent_shift=name == "latent_shift")
    pipe = DiffusionPipeline.from_pretrained(directory)
    if name == "latent_shift":
        return latent_shift_pipeline(pipe)
    return i2vgenxl_pipeline(pipe) if name == "anyv2v" else pipe


def _workload(name: str, pipe, frames: int, size: int, steps: int):
    """A function running one call of the workload, on the same inputs every time (fixed seeds)."""
    import torch

    def generator():
        return torch.Generator().manual_seed(0)

    inputs = torch.Generator().manual_seed(1)
    if name == "latent_shift":
        pipe.set_progress_bar_config(disable=True)
        return lambda: pipe(PROMPT, num_frames=frames, height=size, width=size, num_inference_steps=steps,
                            generator=generator(), output_type="latent")
    if name == "interpolation":
        from swarm.video.interpolation import interpolate_frames

        side = size // pipe.vae_scale_factor
        known = {0: torch.randn(4, side, side, generator=inputs), frames - 1: torch.randn(4, side, side,
                                                                                          generator=inputs)}
        return lambda: interpolate_frames(pipe, PROMPT, frames, known_latents=known, num_inference_steps=steps,
                                          generator=generator(), output_type="latent")
    if name == "consisti2v":
        from swarm.video.consisti2v import consisti2v

        image = torch.rand(1, 3, size, size, generator=inputs) * 2 - 1
        return lambda: consisti2v(pipe, image, PROMPT, num_frames=frames, num_inference_steps=steps,
                                  generator=generator(), output_type="latent")
    from swarm.video.anyv2v import anyv2v

    source = torch.rand(frames, 3, size, size, generator=inputs)
    return lambda: anyv2v(pipe, source, lambda frame: 1 - frame, PROMPT, num_inference_steps=steps,
                          output_type="latent")


def worker(args: argparse.Namespace) -> None:
    """One side of one workload in this fresh process: a warm-up call, ``--runs`` timed calls, a RESULT line."""
    import torch

    peers = args.peers if args.worker == "swarm" else None
    if peers == ["-"]:  # the servers start meanwhile: import what the client needs, then wait for their address
        import swarm.client.pipeline  # noqa: F401

        peers = sys.stdin.readline().split()
    started = time.perf_counter()
    pipe = _load(args.pipeline, args.dir, peers, args.compression)
    load_s = time.perf_counter() - started
    durations: list[float] = []
    began: list[float] = []
    unet = pipe.unet
    unet.register_forward_pre_hook(lambda module, inputs: began.append(time.perf_counter()))
    unet.register_forward_hook(lambda module, inputs, output: durations.append(time.perf_counter() - began.pop()))
    run = _workload(args.pipeline, pipe, args.frames, args.size, args.steps)
    try:
        calls = []
        for index in range(args.runs + 1):
            durations.clear()
            started = time.perf_counter()
            with torch.no_grad():
                run()
            call_s = time.perf_counter() - started
            step_ms = 1000 * statistics.fmean(durations)
            # without the first step, which opens the swarm session: what each further step of a longer run costs
            steady_ms = 1000 * statistics.fmean(durations[1:] or durations)
            print(f"  {args.worker} {args.pipeline} call {index}{' (warm-up)' if index == 0 else ''}: {call_s:.2f} s, "
                  f"{len(durations)} U-Net calls, {step_ms:.0f} ms/step (first {1000 * durations[0]:.0f}, "
                  f"max {1000 * max(durations):.0f})", flush=True)
            if index:
                calls.append((step_ms, call_s, len(durations), steady_ms))
    finally:
        if peers is not None:
            unet.shutdown()
    print(RESULT + json.dumps({"step_ms": statistics.median(c[0] for c in calls),
                               "call_s": statistics.median(c[1] for c in calls), "unet_calls": calls[0][2],
                               "steady_ms": statistics.median(c[3] for c in calls),
                               "threads": torch.get_num_threads(), "load_s": load_s}), flush=True)


def run_worker(side: str, name: str, directory: Path, args: argparse.Namespace, log_dir: Path,
               peers: Callable[[], list[str]] | None = None) -> dict:
    """This script as a worker in a fresh process; its progress lines echoed, its stderr in a log file. ``peers``
    (swarm workers) is called once the worker has started, so that it imports while the servers start."""
    command = [sys.executable, __file__, "--worker", side, "--pipeline", name, "--dir", str(directory),
               "--frames", str(args.frames), "--size", str(args.size), "--steps", str(args.steps),
               "--runs", str(args.runs), "--compression", args.compression, *(["--peers", "-"] if peers else [])]
    log_path = log_dir / f"{name}-{side}.stderr"
    result = None
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                   env=os.environ.copy())
        try:
            if peers:
                process.stdin.write(" ".join(peers()) + "\n")
            process.stdin.close()
            for line in process.stdout:
                if line.startswith(RESULT):
                    result = json.loads(line[len(RESULT):])
                else:
                    print(line, end="", flush=True)
            process.wait()
        except BaseException:  # Ctrl-C, or the Terminated of a SIGTERM: the worker goes too
            process.kill()
            process.wait()
            raise
    if process.returncode or result is None:
        raise RuntimeError(f"{side} worker for {name} exited with {process.returncode}:\n"
                           f"{log_path.read_text()[-4000:]}")
    return result


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny pipelines (a smoke run)")
    parser.add_argument("--compression", default="none", help="the swarm client's codec (default: none)")
    parser.add_argument("--only", nargs="+", choices=PIPELINES, help="these workloads only")
    parser.add_argument("--threads", type=int, help="torch threads of every process (OMP_NUM_THREADS; default: "
                                                    "torch's own, the number of cores)")
    parser.add_argument("--models", type=Path, help="keep the written pipelines here, reuse them next time")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per worker, after one warm-up call")
    parser.add_argument("--frames", type=int, help="frames per video (default: 4; --tiny: 3)")
    parser.add_argument("--size", type=int, help="height and width in pixels (default: 64)")
    parser.add_argument("--steps", type=int, help="denoising steps per call (default: 4; --tiny: 2)")
    # worker mode (what the main process starts)
    parser.add_argument("--worker", choices=("local", "swarm"), help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", choices=PIPELINES, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--peers", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.frames = args.frames or (3 if args.tiny else 4)
    args.size = args.size or 64
    args.steps = args.steps or (2 if args.tiny else 4)
    if args.worker:
        worker(args)
        return
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)

    import importlib.util

    import torch

    from swarm.hub.tiny_diffusion import unet_levels
    from swarm.local_swarm import LocalSwarm

    started = time.perf_counter()
    names = list(args.only or PIPELINES)
    if "interpolation" in names and importlib.util.find_spec("swarm.video.interpolation") is None:
        print("interpolation: skipped, swarm/video/interpolation.py is not there yet", flush=True)
        names.remove("interpolation")
    print(f"torch threads: {torch.get_num_threads()} (cores: {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.2f}); compression={args.compression}; "
          f"{'tiny' if args.tiny else 'bench'} pipelines, {args.size} px, {args.frames} frames, {args.steps} steps",
          flush=True)
    temporary = args.models is None
    root = Path(tempfile.mkdtemp(prefix="video-bench-")) if temporary else args.models
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SWARM_CACHE", str(root / "swarm-cache"))
    results: dict[str, tuple[float, float]] = {}
    steady: dict[str, tuple[float, float]] = {}
    try:
        paths = write_pipelines(root, {KIND[name] for name in names}, args.tiny)
        for kind in dict.fromkeys(KIND[name] for name in names):  # in the order of PIPELINES
            group, path = [name for name in names if KIND[name] == kind], paths[kind]
            local = {name: run_worker("local", name, path, args, root) for name in group}
            levels = unet_levels(path)
            split = levels // 2
            # AnyV2V keeps every frame's features of the injected steps on the servers (each reserving for the
            # places of its own levels): more session memory than the default 16 generations
            extra = ["--max-diffusion-sessions", "64"] if kind == "i2vgenxl" else []
            with LocalSwarm() as swarm:
                servers: list[str] = []

                def peers(swarm=swarm, path=path, levels=levels, split=split, extra=extra, servers=servers):
                    if not servers:  # the first swarm worker's call starts them
                        starting = time.perf_counter()
                        first = swarm.start_server(path, f"0:{split}", [], *extra)
                        swarm.start_server(path, f"{split}:{levels}", [first.maddr], *extra)
                        print(f"  servers of levels 0:{split} and {split}:{levels} ready in "
                              f"{time.perf_counter() - starting:.0f} s", flush=True)
                        servers.append(first.maddr)
                    return servers

                remote = {name: run_worker("swarm", name, path, args, root, peers) for name in group}
            for name in group:
                mine, theirs = local[name], remote[name]
                results[name] = (mine["step_ms"], theirs["step_ms"])
                steady[name] = (mine["steady_ms"], theirs["steady_ms"])
                print(f"{name}: local {mine['step_ms']:.0f} ms/step, swarm {theirs['step_ms']:.0f} ms/step, "
                      f"ratio {theirs['step_ms'] / mine['step_ms']:.2f}", flush=True)
                print(f"  ({mine['unet_calls']} U-Net calls per call; whole call local {mine['call_s']:.2f} s, swarm "
                      f"{theirs['call_s']:.2f} s; worker threads {mine['threads']})", flush=True)
                print(f"  after the first step (which opens the session): local {mine['steady_ms']:.0f} ms/step, "
                      f"swarm {theirs['steady_ms']:.0f} ms/step, ratio {theirs['steady_ms'] / mine['steady_ms']:.2f}",
                      flush=True)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    if results:
        print(f"steady_step_ratio_max={max(swarm / local for local, swarm in steady.values()):.3f}")
        print(f"step_ratio_max={max(swarm / local for local, swarm in results.values()):.3f}")
    print(f"(took {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
