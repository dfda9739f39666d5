"""All of a model's decoder blocks as one module whose computation happens on servers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

from swarm.client.config import ClientConfig
from swarm.client.inference_session import InferenceSession
from swarm.client.remote_forward import RemoteChainFunction
from swarm.client.routing import Hop, RemoteSpan, RouteRequest
from swarm.client.sequence_manager import SequenceManager
from swarm.compression import blockwise

_UNSET = object()  # no use_adapter block active in this thread


class RemoteSequential(nn.Module):
    """``hidden = remote(hidden, position_ids, attention_mask)``; differentiable w.r.t. ``hidden``.

    Inside ``with remote.inference_session(max_length)`` calls go through that session's server-side KV caches
    (each call brings only the new positions); outside, each call is a stateless forward (with backward). Sessions
    are per thread, so several threads can generate through one model at once.
    """

    def __init__(self, client_config: ClientConfig, model_id: str, num_blocks: int, first_block: int = 0,
                 manager: SequenceManager | None = None, blocks: tuple[int, int] | None = None,
                 adapter_choice: threading.local | None = None):
        super().__init__()
        self.client_config, self.model_id, self.num_blocks = client_config, model_id, num_blocks
        self.manager = manager or SequenceManager(client_config, model_id, num_blocks, first_block)
        # The blocks this module stands for: every remote block, or a slice of them (``layers[3:6]``)
        self.start, self.end = blocks if blocks is not None else (self.manager.first_block, num_blocks)
        self._local = threading.local()  # each thread has its own active session: concurrent generate() calls
        # each thread's ``use_adapter`` choice, shared with this module's slices
        self._adapter_choice = adapter_choice if adapter_choice is not None else threading.local()
        if manager is None and "blockwise8" in (client_config.compression, client_config.edge_codec):
            blockwise.warm_up()  # the first 8-bit call imports bitsandbytes (~3 s): not inside the first request

    # ---- a list of blocks, as Petals users index it

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> RemoteSequential:
        """``layers[i]``: block ``start + i`` alone; ``layers[a:b]``: those blocks (a view sharing this client's
        connection and swarm view), each usable for forward, backward and inference sessions."""
        if isinstance(index, slice):
            first, last, step = index.indices(len(self))
            if step != 1 or first >= last:
                raise IndexError(f"remote blocks slice to a non-empty range with step 1, got {index}")
        else:
            first = index + len(self) if index < 0 else index
            if not 0 <= first < len(self):
                raise IndexError(f"block index {index} out of range for {len(self)} remote blocks")
            last = first + 1
        return RemoteSequential(self.client_config, self.model_id, self.num_blocks, manager=self.manager,
                                blocks=(self.start + first, self.start + last), adapter_choice=self._adapter_choice)

    def __iter__(self) -> Iterator[RemoteSequential]:
        return (self[i] for i in range(len(self)))

    @property
    def sliced(self) -> tuple[int, int] | None:
        """This module's blocks when it is a slice; None when it stands for every remote block."""
        whole = (self.start, self.end) == (self.manager.first_block, self.num_blocks)
        return None if whole else (self.start, self.end)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """``position_ids`` default to the positions after what the active session holds (0, 1, ... without one).
        ``prompts``: deep prompts (one per block of this module, (blocks, 1 or batch, prompt length, hidden)), added
        by the servers to the first positions' hidden states before each block; gradients flow back to them.
        In an inference session, prompts go with its first step (the prompt's positions)."""
        session = self.active_session
        if prompts is not None and prompts.shape[0] != self.end - self.start:
            raise ValueError(f"deep prompts are taken one per block: expected {self.end - self.start}, got shape "
                             f"{tuple(prompts.shape)}")
        if position_ids is None:
            past = session.position if session is not None else 0
            position_ids = torch.arange(past, past + hidden.shape[1]).expand(hidden.shape[0], -1)
        if session is not None:
            chunk, tokens = session.config.prefill_chunk, hidden.shape[1]
            if not chunk or tokens <= chunk:
                return session.step(hidden, position_ids, attention_mask, prompts)
            if prompts is not None and prompts.shape[2] > chunk:
                raise ValueError(f"deep prompts of {prompts.shape[2]} positions do not fit in the first prefill "
                                 f"chunk of {chunk}: raise prefill_chunk")
            past, outputs = session.position, []
            for lo in range(0, tokens, chunk):  # chunked prefill: each chunk attends to the ones before it
                hi = min(tokens, lo + chunk)
                mask = attention_mask[:, :past + hi] if attention_mask is not None else None
                outputs.append(session.step(hidden[:, lo:hi], position_ids[:, lo:hi], mask,
                                            prompts if lo == 0 else None))
            return torch.cat(outputs, dim=1)
        return RemoteChainFunction.apply(hidden, position_ids, attention_mask, self.manager, self.sliced, prompts,
                                         self.active_adapter)

    # ---- LoRA adapters served in the swarm

    @property
    def active_adapter(self) -> str | None:
        """The adapter this thread's requests run with: ``use_adapter``'s, else the client's ``active_adapter``."""
        return self._adapter_for(self.client_config)

    def _adapter_for(self, config: ClientConfig) -> str | None:
        choice = getattr(self._adapter_choice, "name", _UNSET)
        return config.active_adapter if choice is _UNSET else choice

    @contextlib.contextmanager
    def use_adapter(self, name: str | None) -> Iterator[None]:
        """Requests started by this thread inside the block run with LoRA adapter ``name`` (None: the base model),
        on servers that hold it."""
        previous = getattr(self._adapter_choice, "name", _UNSET)
        self._adapter_choice.name = name
        try:
            yield
        finally:
            self._adapter_choice.name = previous

    @property
    def active_session(self) -> InferenceSession | None:
        """The session this thread opened with ``inference_session``, if any."""
        return getattr(self._local, "session", None)

    @contextlib.contextmanager
    def inference_session(self, max_length: int, config: ClientConfig | None = None) -> Iterator[InferenceSession]:
        """Keep server-side caches across calls (and across several ``generate`` calls) for up to
        ``max_length`` positions. ``config``: this session's own settings (say, an acceleration method's, made by
        ``dataclasses.replace`` of the client's), used by it alone."""
        if self.active_session is not None:
            raise RuntimeError("an inference session is already active for this model")
        session = InferenceSession(self.manager, max_length, config, self.sliced,
                                   self._adapter_for(config or self.client_config))
        self._local.session = session
        try:
            yield session
        finally:
            self._local.session = None
            session.close()

    @contextlib.contextmanager
    def using_session(self, session: InferenceSession) -> Iterator[InferenceSession]:
        """Make an open ``session`` this thread's active one for the block (``generate(..., session=sess)``)."""
        if session.manager is not self.manager:
            raise ValueError("this inference session belongs to another model")
        if session.closed:
            raise RuntimeError("this inference session is closed")
        previous, self._local.session = self.active_session, session
        try:
            yield session
        finally:
            self._local.session = previous

    def route(self) -> list[RemoteSpan]:
        """The chain of servers a decoding session would take now."""
        return [hop.span for hop in self.explain_route()]

    def explain_route(self, request: RouteRequest | None = None) -> list[Hop]:
        """The chain a request would take now, each hop with its expected costs (``hop.explain()``: a dict); by
        default a decoding step's (with this thread's adapter), pushed from server to server if the client's config
        says so."""
        request = request or RouteRequest(push=self.manager.config.push, adapter=self.active_adapter)
        return self.manager.loop.run(self.manager.route(None, self.num_blocks, request))

    def shutdown(self) -> None:
        self.manager.shutdown()
