"""A swarm server: loads a span of blocks, serves it over libp2p, and announces it in the DHT until stopped."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import suppress
from dataclasses import dataclass, field

import torch

import swarm
from swarm.blocks.quantization import parameter_bytes
from swarm.blocks.span import BlockSpan, load_config
from swarm.compression import blockwise
from swarm.dht.node import start_dht, stop_dht, visible_maddrs
from swarm.dht.records import announce_span
from swarm.dht.schema import ModelInfo, ServerInfo, ServerState
from swarm.hub.source import default_model_id, resolve_model
from swarm.rpc import protocol
from swarm.server.handler import BlockHandler, Limits
from swarm.server.sessions import SessionTable

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ServerConfig:
    model: str | None  # local path or hub name; None: the embedded default model
    start: int
    end: int
    initial_peers: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 0
    announce_maddrs: list[str] | None = None  # what others should dial, if not the listening address
    device: str = "cpu"
    dtype: str = "float32"
    quantization: str = "none"  # weights: none / int8 / nf4 (bitsandbytes)
    cache_tokens: int = 16384  # KV budget: batch x positions over the whole span
    public_name: str | None = None
    model_id: str | None = None  # DHT name of the model; default: hub name or local directory name
    update_period: float = 30.0  # seconds between announcements
    identity_path: str | None = None
    limits: Limits = field(default_factory=Limits)


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_id = config.model_id or default_model_id(config.model)
        self.stopped = asyncio.Event()
        self.span: BlockSpan | None = None
        self.sessions: SessionTable | None = None
        self.state = ServerState.JOINING

    def info(self) -> ServerInfo:
        cfg = self.config
        return ServerInfo(
            state=self.state, start=cfg.start, end=cfg.end, dtype=cfg.dtype, quantization=cfg.quantization,
            version=swarm.__version__,
            public_name=cfg.public_name, cache_tokens_left=self.sessions.tokens_left if self.sessions else 0,
            max_session_length=cfg.limits.max_session_length,
        )

    def rpc_info(self) -> dict:
        return {**self.info().to_dict(), "model_id": self.model_id, "protocol": protocol.PROTOCOL_VERSION,
                "hidden_size": self.span.hidden_size, "sessions": len(self.sessions.sessions),
                "max_message_bytes": self.config.limits.max_message_bytes,
                "max_batch_tokens": self.config.limits.max_batch_tokens}

    async def run(self) -> None:
        cfg = self.config
        source = await asyncio.to_thread(resolve_model, cfg.model)
        model_config = await asyncio.to_thread(load_config, source)
        model_info = ModelInfo(model_config.num_hidden_layers, repository=source.repo_id or source.name,
                               model_type=model_config.model_type)
        if not 0 <= cfg.start < cfg.end <= model_info.num_blocks:
            raise ValueError(f"--blocks {cfg.start}:{cfg.end} is outside the model's 0:{model_info.num_blocks}")

        p2p, node = await start_dht(cfg.initial_peers, host=cfg.host, port=cfg.port,
                                    announce_maddrs=cfg.announce_maddrs, identity_path=cfg.identity_path)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopped.set)
        handler = None
        try:
            expiration = max(2.5 * cfg.update_period, 10.0)
            await announce_span(node, self.model_id, self.info(), model_info, expiration)

            logger.info(f"Loading blocks {cfg.start}:{cfg.end} of {source.name} ({cfg.dtype}, "
                        f"{cfg.quantization} weights, on {cfg.device})...")
            self.span = await asyncio.to_thread(BlockSpan.from_pretrained, source, cfg.start, cfg.end,
                                                dtype=DTYPES[cfg.dtype], device=cfg.device,
                                                quantization=cfg.quantization)
            logger.info(f"Blocks hold {parameter_bytes(self.span.layers) / (cfg.end - cfg.start) / 2**20:.1f} MiB "
                        "each")
            await asyncio.to_thread(blockwise.warm_up)  # bitsandbytes' first call imports it (~2-3 s)
            self.sessions = SessionTable(cfg.cache_tokens, cfg.end - cfg.start)
            handler = BlockHandler(self.span, self.sessions, cfg.limits, self.rpc_info)
            await handler.register(p2p)

            self.state = ServerState.ONLINE
            await announce_span(node, self.model_id, self.info(), model_info, expiration)
            maddrs = await visible_maddrs(p2p)
            print(f"Server ready: blocks {cfg.start}:{cfg.end} of {self.model_id} as peer {p2p.peer_id}", flush=True)
            print("Join this swarm with: --initial-peers " + " ".join(maddrs), flush=True)

            while not self.stopped.is_set():
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), cfg.update_period)
                if not self.stopped.is_set():
                    await announce_span(node, self.model_id, self.info(), model_info, expiration)

            logger.info("Shutting down: announcing offline")
            self.state = ServerState.OFFLINE
            with suppress(Exception):
                await asyncio.wait_for(announce_span(node, self.model_id, self.info(), None, expiration), 5)
        finally:
            if handler is not None:
                handler.shutdown()
            await stop_dht(p2p, node)
