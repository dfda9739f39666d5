"""Per-request acceleration for a distributed model: choose a method, apply it, measure and record the outcome.

``from_pretrained(..., acceleration="auto")`` makes every ``generate`` go through ``Selector.generate``: the task's
features are measured (the chain the request would take, its RTT and bandwidth, cached for a minute), the
learner fitted on the recorded history picks a method (or the expert rule when the history is empty, unreadable
or knows nothing like this task; or, with a small probability, a random method to keep exploring), the method's
settings are given to this request's session only (the model's config is never changed), and its measured outcome
is appended to the history.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from swarm.acceleration import summaries
from swarm.acceleration.features import TaskFeatures, probe_chain, task_features
from swarm.acceleration.history import History, Outcome, Record
from swarm.acceleration.learner import Choice, Learner, expert_rule
from swarm.acceleration.methods import METHODS, configure, get_method
from swarm.dht.schema import ServerState
from swarm.rpc.framing import TRAFFIC

if TYPE_CHECKING:
    from swarm.client.config import ClientConfig

logger = logging.getLogger(__name__)

LINK_CACHE_SECONDS = 60.0  # RTT and bandwidth probes of a chain are reused this long
REFIT_EVERY = 20  # new records before the learner is refitted
OWN_HISTORY_ENOUGH = 200  # with fewer records of its own, a client also learns from the swarm's summaries
SWARM_HISTORY_SECONDS = 300.0


class Selector:
    def __init__(self, model, history: History | None = None, seed: int | None = None):
        self.model = model
        config = model.get_remote().client_config
        self.config = config
        if config.acceleration != "auto":
            get_method(config.acceleration)  # an unknown name fails at from_pretrained, not at the first request
        if config.acceleration_objective not in ("latency", "throughput", "cost"):
            raise ValueError(f"unknown acceleration_objective {config.acceleration_objective!r}: latency, "
                             "throughput or cost")
        self.history = history or History(config.history_path)
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.learner: Learner | None = None
        self.fitted_on = -1  # records the learner was fitted on
        self.links: dict[tuple[str, ...], tuple[float, tuple[float, float]]] = {}
        self.last: tuple[Choice, TaskFeatures, Outcome] | None = None  # of the latest request, for callers
        self.swarm_records: list[Record] = []
        self.swarm_fetched_at = -float("inf")

    # ---- what the swarm offers

    def available(self) -> list[str]:
        """Methods whose servers exist now: a quantization is offered only if its servers cover every block."""
        remote = self.model.get_remote()
        manager = remote.manager
        manager.loop.run(manager.update())
        covered: dict[str, set[int]] = {}
        for info in manager.servers.values():
            if info.state == ServerState.ONLINE:
                covered.setdefault(info.quantization, set()).update(range(info.start, info.end))
        full = {q for q, blocks in covered.items() if blocks >= set(range(remote.num_blocks))}
        return [name for name, method in METHODS.items() if method.quantization in full
                and method.local_blocks < remote.num_blocks]

    # ---- features, choice, outcome

    def features(self, batch_size: int, prompt_length: int, new_tokens: int) -> TaskFeatures:
        remote = self.model.get_remote()
        chain = [span.peer_id for span in remote.route()]
        key = tuple(chain)
        cached = self.links.get(key)
        if cached is None or time.monotonic() - cached[0] > LINK_CACHE_SECONDS:
            link = remote.manager.loop.run(probe_chain(remote.manager.p2p, chain))
            self.links[key] = cached = (time.monotonic(), link)
        return task_features(self.model, batch_size, prompt_length, new_tokens, chain, cached[1])

    def swarm_history(self) -> list[Record]:
        """Summaries servers announce (summaries.py), fetched at most every ``SWARM_HISTORY_SECONDS``."""
        now = time.monotonic()
        if now - self.swarm_fetched_at > SWARM_HISTORY_SECONDS:
            manager = self.model.get_remote().manager
            try:
                self.swarm_records = manager.loop.run(summaries.fetch(manager.dht, manager.model_id), timeout=30)
            except Exception as e:  # the DHT is slow or unreachable: learn from what we have
                logger.warning(f"Could not fetch the swarm's acceleration summaries: {e}")
            self.swarm_fetched_at = now
        return self.swarm_records

    def _learner(self) -> Learner | None:
        records = self.history.records()
        if len(records) < OWN_HISTORY_ENOUGH:  # a new node: start from what the swarm has measured
            records += self.swarm_history()
        if len(records) != self.fitted_on:
            if not records:
                self.learner = None
            elif self.learner is None or abs(len(records) - self.fitted_on) >= REFIT_EVERY:
                try:
                    self.learner = Learner().fit(records, self.config.acceleration_objective,
                                                 self.config.quality_floor)
                except (ValueError, RuntimeError) as e:
                    logger.warning(f"Acceleration history unusable ({e}); using the expert rule")
                    self.learner = None
            self.fitted_on = len(records)
        return self.learner

    def choose(self, features: TaskFeatures, available: list[str]) -> Choice:
        requested = self.config.acceleration
        if requested != "auto":
            return Choice(get_method(requested).name, "explicit", 1.0, 0.0)
        with self.lock:
            learner = self._learner()
        if learner is None:
            logger.warning("No acceleration history yet: choosing by the expert rule")
            return Choice(expert_rule(features, available), "expert", 0.0, float("inf"))
        if self.random.random() < self.config.exploration:
            return Choice(self.random.choice(available), "explore", 0.0, learner.novelty(features))
        return learner.choose(features, available)

    def generate(self, run: Callable[[ClientConfig], object], batch_size: int, prompt_length: int,
                 new_tokens: int, speculable: bool = False) -> object:
        """``run(config)`` (the plain generate, in a session with these settings) under the chosen method, measured
        and recorded. ``speculable``: a greedy single-sequence request, which speculative methods may serve."""
        available = [name for name in self.available() if speculable or not METHODS[name].prompt_lookup]
        features = self.features(batch_size, prompt_length, new_tokens)
        choice = self.choose(features, available)
        method = get_method(choice.method)
        traffic = sum(TRAFFIC.values())
        timing = self.model.__dict__.setdefault("_step_times", [])
        timing.clear()
        settings = configure(self.config, method)  # this request's alone: the model's config stays as it is
        started = time.perf_counter()
        output = run(settings)
        finished = time.perf_counter()
        first = timing[0] if timing else finished  # the prefill's logits: the first token is known
        outcome = Outcome.timed(started, first, finished, batch_size, new_tokens, sum(TRAFFIC.values()) - traffic)
        task = f"local-{hash((features.model_params, batch_size, prompt_length, new_tokens, features.chain_length))}"
        self.history.add(Record(task=task, features=features, method=method.name, outcome=outcome, source="local",
                                model=str(getattr(self.model, "name_or_path", "")), time=time.time()))
        self.last = (replace(choice), features, outcome)
        logger.info(f"Acceleration: {method.name} ({choice.reason}, confidence {choice.confidence:.2f}); "
                    f"{outcome.total_s:.2f} s, {outcome.tokens_per_s:.1f} tokens/s, {outcome.bytes} B")
        return output
