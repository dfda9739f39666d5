"""Deliberate misbehaviour for tests of failover and verification: a server that errs, perturbs or invents its
outputs. Read only from the ``SWARM_TEST_FAULT`` environment variable, never from a flag or a request, so it
cannot be switched on by normal use:

- ``error-after-steps:N``: answer every inference step after the first N with an error
- ``perturb:EPS``: add Gaussian noise of relative size EPS (||noise|| = EPS * ||output||) to every output
- ``random``: return random tensors of the right shape and scale
- ``slow-pieces:SECONDS``: sleep this long before each piece of compute (a slow machine; work that is dropped)
- ``black-hole``: accept sessions and requests, never answer them (with a made-up speed: a server that lies)
- ``edit-weight``: serve the span with one weight changed (announcing the commitment of what it serves)
- ``truncate-proof``: hand out proofs (``--zk``) cut to half their length (a stand-in, not a real proof, is cut)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

ENV = "SWARM_TEST_FAULT"


@dataclass(frozen=True)
class Faults:
    error_after_steps: int | None = None
    perturb: float | None = None
    random: bool = False
    slow_pieces: float | None = None
    black_hole: bool = False
    edit_weight: bool = False
    truncate_proof: bool = False

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(ENV, "").strip()
        if not spec:
            return cls()
        kind, _, value = spec.partition(":")
        if kind == "error-after-steps":
            return cls(error_after_steps=int(value))
        if kind == "perturb":
            return cls(perturb=float(value))
        if kind == "random":
            return cls(random=True)
        if kind == "slow-pieces":
            return cls(slow_pieces=float(value))
        if kind == "black-hole":
            return cls(black_hole=True)
        if kind == "edit-weight":
            return cls(edit_weight=True)
        if kind == "truncate-proof":
            return cls(truncate_proof=True)
        raise ValueError(f"unknown {ENV} {spec!r}")

    @property
    def active(self) -> bool:
        return self != Faults()

    def slowed(self, work: Callable[[], Generator]) -> Callable[[], Generator]:
        """``work`` (pieces on the compute thread), each piece ``slow_pieces`` seconds slower."""
        if not self.slow_pieces:
            return work
        seconds = self.slow_pieces

        def run() -> Generator:
            pieces = work()
            while True:
                time.sleep(seconds)
                try:
                    next(pieces)
                except StopIteration as done:
                    return done.value
                yield

        return run

    def edit_one_weight(self, module: torch.nn.Module) -> None:
        """With ``edit-weight``: add 0.01 to the first floating-point weight of ``module``."""
        if not self.edit_weight:
            return
        for parameter in module.parameters():
            if parameter.is_floating_point():
                with torch.no_grad():
                    parameter.view(-1)[0] += 0.01
                return

    def corrupt(self, output: torch.Tensor) -> torch.Tensor:
        if self.random:
            return torch.randn_like(output) * output.float().std().to(output.dtype)
        if self.perturb:
            noise = torch.randn_like(output)
            return output + noise * (self.perturb * output.norm() / noise.norm().clamp_min(1e-12))
        return output

    def corrupt_proof(self, proof: bytes) -> bytes:
        return proof[:len(proof) // 2] if self.truncate_proof else proof
