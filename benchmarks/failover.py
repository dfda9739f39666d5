"""Seconds from a server's SIGKILL to the next generated token, on loopback (SmolLM2-135M, 2 hops, float32).

Blocks 0:15 on one server; blocks 15:30 on a fast-announced replica (so routing picks it) and a slow one. After
a number of generated tokens the replica in use is killed; the next token needs a new route and a replay of the
session's history (prompt + tokens so far) on the other replica. Repeated with fresh replicas; medians printed.

Duration on a 2-core machine: 61 s (measured, 3 runs). Processes: a server for blocks 0:15, then two replicas of
15:30 per run (seven servers in all, at most three alive at once), each with its p2pd daemon, and a client p2pd per
run; all stopped when it ends, also on Ctrl-C, SIGTERM (``timeout``) or SIGHUP (a closed terminal).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import StoppingCriteria  # noqa: E402

from swarm import EMBEDDED_MODEL, AutoDistributedModelForCausalLM  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402


class TokenClock(StoppingCriteria):
    """Records when each token is produced; kills the victim once the sequence reaches ``kill_at``."""

    def __init__(self, kill_at: int, kill):
        self.kill_at, self.kill, self.killed_at, self.times = kill_at, kill, None, []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.monotonic())
        if input_ids.shape[1] == self.kill_at and self.killed_at is None:
            self.kill()
            self.killed_at = time.monotonic()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens-before-kill", type=int, default=16)
    args = parser.parse_args()
    ids = torch.randint(100, 40000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    gaps, normal = [], []
    with LocalSwarm() as swarm:
        first = swarm.start_server(None, "0:15", [])
        for run in range(args.runs):
            fast = swarm.start_server(None, "15:30", [first.maddr], "--throughput", "100000", wait=False)
            slow = swarm.start_server(None, "15:30", [first.maddr], "--throughput", "1", wait=False)
            fast.wait_ready(), slow.wait_ready()
            model = AutoDistributedModelForCausalLM.from_pretrained(EMBEDDED_MODEL, initial_peers=[first.maddr])
            clock = TokenClock(args.prompt_tokens + args.tokens_before_kill, lambda p=fast: p.signal(signal.SIGKILL))
            try:
                with model.inference_session(max_length=args.prompt_tokens + 64) as session:
                    model.generate(ids, max_new_tokens=args.tokens_before_kill + 8, min_new_tokens=8,
                                   do_sample=False, stopping_criteria=[clock])
                    assert session.chain[-1].peer_id == slow.peer_id
            finally:
                model.shutdown()
            index = args.tokens_before_kill  # times[i]: token i+1 produced; the kill happened at times[index - 1]
            gaps.append(clock.times[index] - clock.killed_at)
            steps = clock.times[1:index]
            normal.append(statistics.median(b - a for a, b in zip(steps, steps[1:], strict=False)))
            print(f"run {run}: next token {gaps[-1]:.3f} s after the SIGKILL (a normal step: {normal[-1]:.3f} s)",
                  flush=True)
            slow.stop()
    print(f"failover: median {statistics.median(gaps):.3f} s from SIGKILL to the next token "
          f"(normal step {statistics.median(normal):.3f} s; prompt {args.prompt_tokens} + "
          f"{args.tokens_before_kill} tokens replayed)")


if __name__ == "__main__":
    main()
