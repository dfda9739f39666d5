"""Backward through served U-Net levels: gradients w.r.t. what a pass took (sample, time embedding, encoder hidden
states), never w.r.t. the servers' weights, which stay frozen. A client trains what it holds (a LoRA or textual
inversion in its head, a conditioning encoder) through servers that only ever run inference-sized work.

Two session steps mirror the two passes, each taking the gradient of what its pass returned and giving the gradient
of what it took:

* ``up_backward`` (a server below the mid block): recompute the down pass of its levels from the down input (the
  skips, with their graph) and the up pass from the up input, then differentiate the up output. It returns the
  gradient w.r.t. the up input (``grad_up_sample``, for the next server), and the part of the down input's
  gradient that flows through the skips (``grad_sample``);
* ``down_backward``: recompute the down pass (for the server holding the mid block: down, mid and up, as its
  ``down`` step ran) and differentiate its output. It returns ``grad_sample`` w.r.t. the down input.

Both also return ``grad_temb`` and ``grad_encoder_hidden_states`` (w.r.t. the session's states): the client sums
them over every step of the chain, and adds a server's two ``grad_sample`` parts. For a chain hop0 -> hop1 (mid)
the order is hop0.up_backward, hop1.down_backward, hop0.down_backward: the gradient of hop0's down output depends
on hop1, which depends on the gradient of hop0's up input.

Why recomputation from inputs the client resends (the ones it sent for the forward, still encoded) rather than
activations or gradients kept on the server: a server keeps nothing between requests, so training costs no session
memory at all (nothing to reserve, nothing left behind by a forward whose backward never comes), any number of
evaluations may run before one backward (a loss over several U-Net calls), and a server that fails is replaced by
running the evaluation again. The price is compute: the down pass runs three times (forward, ``up_backward``,
``down_backward``). A backward's activations exist only while it computes, in a single piece of the compute
thread (grad mode is per thread, and a graph kept across pieces would let several sessions' activations pile up),
and the request is bounded like a forward: the down pass's own checks (declared sample shape, attention size,
sizes chain) and a predicted cost of three forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from swarm.blocks import latent_shift, unet_modifiers
from swarm.blocks.served import Bounds, Prepared
from swarm.blocks.unet_adapters import LoraChoice, read_scale
from swarm.rpc.messages import read_float_tensor, read_sizes
from swarm.rpc.protocol import RequestError

if TYPE_CHECKING:
    from swarm.blocks.unet import LevelsSession, UNetLevels

BACKWARD_STEPS = ("up_backward", "down_backward")
BACKWARD_FLOPS = 3.0  # a recomputed forward plus its backward (about twice a forward)


@dataclass
class _Refused:
    """A reason to refuse found only once the forward is recomputed (the output's shape): raised after compute."""

    reason: str


def prepare_backward(levels: UNetLevels, kind: str, message: dict, session: LevelsSession,
                     bounds: Bounds) -> Prepared:
    """Check an ``up_backward`` / ``down_backward`` step of ``session`` and make its computation (one piece)."""
    n = levels.n
    holds_mid = session.end == n + 1
    if kind == "up_backward" and holds_mid:
        raise RequestError(f"levels {session.start}:{session.end} hold the mid block: their up pass runs within "
                           "'down', so its gradient comes from 'down_backward'")
    # The down input goes through the down pass's own checks (channels, temb width, batch, sizes chain, declared
    # sample shape, attention size, cost): nothing runs, only the checks and the cost estimate are used.
    down = levels.prepare("down", {"type": "down", **{key: message[key] for key in ("sample", "temb", "input_sizes")
                                                      if key in message}}, session, bounds)
    sample = read_float_tensor(message, "sample", bounds.max_numel, 4)
    temb = read_float_tensor(message, "temb", bounds.max_numel, 2)
    sizes = [list(size) for size in read_sizes(message)]
    lora = LoraChoice(session.adapters, read_scale(message))  # the forward's scale, resent with its inputs
    grad_output = read_float_tensor(message, "grad_output", bounds.max_numel, 4,
                                    layout="batch, channels, height, width")
    batch = sample.shape[0]
    if grad_output.shape[0] != batch:
        raise RequestError(f"grad_output has batch {grad_output.shape[0]}, the sample {batch}")
    up_sample = None
    if kind == "up_backward":
        up_sample = read_float_tensor(message, "up_sample", bounds.max_numel, 4,
                                      layout="batch, channels, height, width")
        top = min(session.end, n) - 1  # the level whose up block took up_sample
        expected = _size_at(levels, list(sample.shape[2:]), session.start, top)
        if up_sample.shape[0] != batch or list(up_sample.shape[2:]) != expected:
            raise RequestError(f"up_sample of {list(up_sample.shape)} does not fit level {top}: batch {batch}, "
                               f"size {expected}")
        flops = levels.flops(batch, list(sample.shape[2:]), session.start, top + 1,
                             session.encoder_hidden_states.shape[1] if session.encoder_hidden_states is not None
                             else 0, down=True, up=True)
    else:
        flops = down.flops
    flops *= BACKWARD_FLOPS
    levels.check_cost(flops, bounds)

    def run():
        yield from ()  # one piece (see the module's docstring)
        with torch.enable_grad():
            inputs = {"sample": levels._on_device(sample).requires_grad_(True),
                      "temb": levels._on_device(temb).requires_grad_(True)}
            if up_sample is not None:
                inputs["up_sample"] = levels._on_device(up_sample).requires_grad_(True)
            if session.encoder_hidden_states is not None:
                inputs["encoder_hidden_states"] = \
                    levels._on_device(session.encoder_hidden_states).detach().requires_grad_(True)
            output = recompute(levels, session, inputs["sample"], inputs["temb"],
                               inputs.get("encoder_hidden_states"), sizes, inputs.get("up_sample"), lora)
        if output.shape != grad_output.shape:
            return _Refused(f"grad_output has shape {list(grad_output.shape)}, but this pass's output has "
                            f"{list(output.shape)}")
        grads = torch.autograd.grad(output, list(inputs.values()), grad_output.to(output.device, output.dtype),
                                    allow_unused=True)
        return {f"grad_{name}": torch.zeros_like(value) if grad is None else grad
                for (name, value), grad in zip(inputs.items(), grads, strict=True)}

    def finish(result: dict | _Refused) -> tuple[dict, dict[str, torch.Tensor]]:
        if isinstance(result, _Refused):
            raise RequestError(result.reason)
        if not all(torch.isfinite(grad).all() for grad in result.values()):
            raise RequestError("the gradients overflowed to NaN or infinite values in this server's dtype")
        if kind == "up_backward":  # the main output first: what the next server takes
            result = {"grad_up_sample": result.pop("grad_up_sample"), **result}
        return {}, result

    return Prepared(run, flops, batch, finish, sample.dtype, extra={"evaluated": False})


def _size_at(levels: UNetLevels, size: list[int], start: int, level: int) -> list[int]:
    """The sample's height and width at ``level`` from its size at ``start`` (each down block but the last halves
    it, rounding up)."""
    for index in range(start, level):
        if index < levels.n - 1:
            size = [-(-d // 2) for d in size]
    return size


def recompute(levels: UNetLevels, session: LevelsSession, sample: torch.Tensor, temb: torch.Tensor,
              ehs: torch.Tensor | None, sizes: list[list[int]], up_sample: torch.Tensor | None,
              lora: LoraChoice) -> torch.Tensor:
    """The forward of ``session``'s levels as its passes ran it, recorded for autograd: the down pass (with the
    mid block and the up pass for the server holding the mid block), or, given ``up_sample``, the down pass for
    its skips then the up pass from ``up_sample``."""
    n = levels.n
    stashes, out_sizes, current = {}, [list(size) for size in sizes], sample
    # the session's attention processors, as its passes ran; per-pass feature exchanges are not differentiated
    # (the client refuses training with them)
    with latent_shift.active(session.latent_shift_frames), unet_modifiers.active(session.processors):
        for level in range(session.start, session.end):
            if level < n:
                out_sizes.append(list(current.shape[-2:]))
            current, stash = levels.down(level, current, temb, ehs, session.extra, lora)
            if stash is not None:
                stashes[level] = stash
        if session.end <= n:  # below the mid block: the down output goes on down the chain
            if up_sample is None:
                return current
            current = up_sample
        for level in reversed(range(session.start, min(session.end, n))):
            size = levels.upsample_size(level, [tuple(size) for size in out_sizes], session.forward_upsample_size)
            current = levels.up(level, current, temb, ehs, session.extra, stashes[level], size, freeu=session.freeu,
                                lora=lora)
    return current
