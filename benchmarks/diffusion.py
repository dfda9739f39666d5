"""One denoising step of an SD1.5-size U-Net (860M parameters, random weights, float32, 64x64 latents, batch 1):
local vs the swarm (two servers on loopback, U-shaped: skips stay on the servers) vs a linear chain that carries
the skips over the network (the same servers in ``carry_skips`` mode). Seconds and bytes per step, side by side.

    python benchmarks/diffusion.py [--runs 3] [--local-runs N] [--split LEVEL]
    python benchmarks/diffusion.py --tiny     # the same on a tiny random U-Net: a smoke run, its figures mean nothing

Duration on a 2-core machine: 134 s on the first run, which builds the 3.4 GB U-Net in the cache (measured); --tiny:
30 s (measured). Processes: two U-Net servers, each with its p2pd daemon, and a client p2pd per configuration
(three, one at a time); all stopped when it ends, also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed
terminal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from tiny_diffusion import save_sd15_size_unet  # noqa: E402

from swarm.blocks.unet import load_head_and_tail  # noqa: E402
from swarm.client.config import ClientConfig  # noqa: E402
from swarm.client.diffusion import RemoteUNet  # noqa: E402
from swarm.hub.source import resolve_model  # noqa: E402
from swarm.hub.tiny_diffusion import build_random, tiny_sd_unet_config  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.utils.cache import cache_root  # noqa: E402


def timed(fn, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        with torch.no_grad():
            result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--local-runs", type=int, help="runs of the local baseline (default: --runs)")
    parser.add_argument("--split", type=int, help="levels [0, split) on the first server (default: half of them)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random U-Net instead (seconds; for smoke runs)")
    args = parser.parse_args()
    if args.tiny:
        path = cache_root() / "bench" / "tiny-sd-unet"
        if not (path / "config.json").exists():
            build_random(UNet2DConditionModel, tiny_sd_unet_config(), seed=0).save_pretrained(path)
    else:
        path = cache_root() / "bench" / "sd15-size-unet"
        if not (path / "config.json").exists():
            print(f"Building the SD1.5-size U-Net with random weights in {path} (once, ~20 s, 3.4 GB)...", flush=True)
            save_sd15_size_unet(path)
    config = UNet2DConditionModel.load_config(path)
    levels = len(config["down_block_types"]) + 1
    split = args.split or levels // 2
    side = config["sample_size"]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, config["in_channels"], side, side, generator=generator)
    ehs = torch.randn(1, 77, config["cross_attention_dim"], generator=generator)
    timestep = torch.tensor(500)

    local = UNet2DConditionModel.from_pretrained(path).eval()
    timed(lambda: local(sample, timestep, ehs), 1)  # warm-up
    local_time, reference = timed(lambda: local(sample, timestep, ehs).sample, args.local_runs or args.runs)
    print(f"local: {local_time:.2f} s per step", flush=True)
    local = None  # frees its 3.4 GB before the servers load theirs

    results = {}
    with LocalSwarm() as swarm:
        first = swarm.start_server(path, f"0:{split}", [], "--session-timeout", "600")
        second = swarm.start_server(path, f"{split}:{levels}", [first.maddr], "--session-timeout", "600")
        print(f"servers: levels 0:{split} and {split}:{levels} on 127.0.0.1 (pids {first.proc.pid} and "
              f"{second.proc.pid}, logs in {swarm.directory})", flush=True)
        for name, compression, carry in (("swarm, U-shaped, raw float32", "none", False),
                                         ("swarm, U-shaped, default codecs", "blockwise8", False),
                                         ("linear chain carrying skips, raw", "none", True)):
            remote = RemoteUNet(load_head_and_tail(resolve_model(path)),
                                ClientConfig(initial_peers=[first.maddr], compression=compression), path.name)
            remote.carry_skips = carry
            try:
                timed(lambda remote=remote: remote(sample, timestep, ehs), 1)  # warm-up, opens the session
                seconds, output = timed(lambda remote=remote: remote(sample, timestep, ehs).sample, args.runs)
                traffic = remote.session.traffic[-1]
                step_bytes = sum(hop.sent + hop.received for hop in traffic)
                error = ((output - reference).norm() / reference.norm()).item()
                results[name] = (seconds, step_bytes)
                print(f"{name}: {seconds:.2f} s per step ({seconds / local_time:.2f}x local), "
                      f"{step_bytes / 2**20:.1f} MiB per step on the wire, relative error {error:.1e}", flush=True)
            finally:
                remote.shutdown()
    u_shaped, linear = results["swarm, U-shaped, raw float32"], results["linear chain carrying skips, raw"]
    print(f"U-shaped carries {linear[1] / u_shaped[1]:.1f}x fewer bytes than a linear chain; "
          f"step_time_ratio={u_shaped[0] / local_time:.3f} (swarm / local, raw float32)")


if __name__ == "__main__":
    main()
