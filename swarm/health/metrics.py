"""Prometheus metrics of the latest state, computed at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from swarm.health.state import SwarmState


class StateCollector(Collector):
    def __init__(self, get_state: Callable[[], SwarmState]):
        self.get_state = get_state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self.get_state()
        per_model = {
            "swarm_servers_online": ("Online servers that answered the monitor",
                                     lambda m: sum(s.reachable is True for s in m.servers)),
            "swarm_servers_unreachable": ("Servers announced online that did not answer the monitor",
                                          lambda m: sum(s.reachable is False for s in m.servers)),
            "swarm_blocks": ("Blocks of the model", lambda m: m.num_blocks),
            "swarm_blocks_zero_coverage": ("Blocks no online, reachable server holds", lambda m: m.missing_blocks),
            "swarm_model_healthy": ("1 if every block has an online, reachable server", lambda m: int(m.healthy)),
            "swarm_throughput_sum": ("Announced tokens/s of the online, reachable servers",
                                     lambda m: m.throughput_sum),
            "swarm_weakest_block_throughput": ("Tokens/s of the least served block",
                                               lambda m: m.weakest_block_throughput),
        }
        for name, (doc, value) in per_model.items():
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for model in state.models:
                family.add_metric([model.model_id], value(model))
            yield family
        rtt = GaugeMetricFamily("swarm_server_rtt_seconds", "Monitor-to-server RTT quantiles over reachable servers",
                                labels=["quantile"])
        if state.rtts_ms:
            for q in (0.5, 0.9, 0.99):
                rtt.add_metric([str(q)], float(np.quantile(state.rtts_ms, q)) / 1000)
        yield rtt
        yield GaugeMetricFamily("swarm_monitor_last_refresh_timestamp_seconds", "Unix time of the last refresh",
                                value=state.updated_at)


def render_metrics(get_state: Callable[[], SwarmState]) -> bytes:
    registry = CollectorRegistry()
    registry.register(StateCollector(get_state))
    return generate_latest(registry)
