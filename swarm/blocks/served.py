"""The served-block protocol: what a server needs to know of the blocks it serves, whatever their kind.

A transformer span (span.py) and U-Net levels (unet.py) both implement ``ServedBlocks``: how a session opens and
how many bytes it reserves, which kinds of step it serves (``step``, and the one-shot ``forward``/``backward``, for a
span; ``down``/``up`` and their backward steps for levels), how each kind's inputs are checked, what a request will
cost before it runs (floating-point operations: attention over positions x context for a span, over pixels squared
for levels), and how fast the blocks compute (measured). The server's session loop, session table, admission and
compute queue (swarm/server) are the same for every kind; only this differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.rpc.protocol import RequestError

Work = Callable[[], Generator[None, None, Any]]  # pieces on the compute thread (swarm/server/compute.py)


@dataclass(frozen=True)
class Bounds:
    """What one request may ask of a server (set from its command line; see swarm/server/handler.py Limits)."""

    max_batch_tokens: int = 8192  # batch rows x new tokens of a span request
    max_session_length: int = 8192  # positions of one inference session
    max_numel: int = 2**28  # elements of any one tensor
    max_sample_pixels: int = 2**20  # batch x height x width of a U-Net sample
    max_attention_tokens: int = 128 * 128  # positions one image attends over at a U-Net level (cost: its square)
    max_encoder_tokens: int = 4096  # cross-attention keys per row (text tokens, image embeddings)
    max_request_seconds: float = 120.0  # predicted compute time of one request at the blocks' measured speed


@dataclass(frozen=True)
class SpanSpeed:
    """What a server announces of its speed (DHT records, routing)."""

    inference_rps: float  # steps/s over the whole span at batch 1 (decode steps; U-Net evaluations)
    forward_tps: float  # tokens/s of a prefill-size forward (U-Net: latent pixels/s)


@dataclass(eq=False)
class BlockSession:
    """A session's state in the blocks (a KV cache; a generation's conditioning and skips), and what it reserves."""

    start: int
    end: int
    reserved: int  # bytes held for it in the server's session budget
    output_codec: str = "none"
    blocks: ServedBlocks | None = None  # the blocks it opened on (a server moving its blocks keeps them for it)


@dataclass(eq=False)
class Prepared:
    """A checked request, ready for the compute thread."""

    run: Work  # the computation, in pieces
    flops: float  # its estimated cost
    usage: int  # what it counts for (batch rows x positions for a span; samples x levels for levels)
    finish: Callable[[Any], tuple[dict, dict[str, torch.Tensor]]]  # after compute: reply fields, tensors to encode
    dtype: torch.dtype = torch.float32  # of the caller's tensors: outputs are sent back in it
    batch_key: object = None  # decode steps with equal keys may run merged (swarm/server/batching.py)
    payload: object = None  # what the batch runner needs
    serial: bool = False  # small enough to run best on one thread (swarm/server/compute.py)
    extra: dict = field(default_factory=dict)  # kind-specific facts the server loop reports (e.g. pushable)


class ServedBlocks(ABC):
    """Blocks a server serves: a span of decoder layers, or levels of a U-Net."""

    kind: str = ""  # "span" or "levels"
    session_steps: tuple[str, ...] = ()  # step kinds inside a session
    one_shots: tuple[str, ...] = ()  # kinds served as one request, one reply, without a session
    start: int
    end: int
    flops_per_second: float | None = None  # measured (at start or on the requests served); None: not yet
    # errors the blocks raise on inputs that passed the checks but still do not fit: the request's fault
    input_errors: tuple[type[BaseException], ...] = (ValueError,)

    def input_error_message(self, error: BaseException) -> str:
        return str(error)

    @abstractmethod
    def open_session(self, message: dict, bounds: Bounds) -> BlockSession:
        """Check an ``open`` message; the new session's state, with the bytes it reserves."""

    @abstractmethod
    def prepare(self, kind: str, message: dict, session: BlockSession | None, bounds: Bounds) -> Prepared:
        """Check a request of ``kind`` (in ``session``, or a one-shot with None) and make its computation."""

    def check_cost(self, flops: float, bounds: Bounds) -> None:
        """Refuse a request whose predicted compute time exceeds the bound, before it runs."""
        rate = self.flops_per_second
        if rate and flops / rate > bounds.max_request_seconds:
            raise RequestError(f"this request would take about {flops / rate:.0f} s of compute here (limit "
                               f"{bounds.max_request_seconds:.0f} s): send it in smaller parts")

    def measured_request(self, flops: float, seconds: float) -> None:  # noqa: B027 (optional hook)
        """A request served took ``seconds`` of compute for ``flops``: blocks measured only at start ignore it."""

    def announced_speed(self) -> SpanSpeed | None:
        """The speed to announce when none was measured at start (None: nothing known yet)."""
        return None

    def fold_speed(self, flops: float, seconds: float) -> None:
        """Fold one request's compute time into the measured speed (an EMA of FLOPs per second)."""
        if flops <= 0 or seconds <= 0:
            return
        rate = flops / seconds
        self.flops_per_second = rate if self.flops_per_second is None else 0.8 * self.flops_per_second + 0.2 * rate
