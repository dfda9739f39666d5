"""Request planners: a plugin that chooses each ``generate``'s settings and records how it went.

The client defines the interface and finds implementations by name in the entry point group ``swarm.planners``
(the project's own, ``acceleration``, is swarm/acceleration/selector.py), so it never imports them: a planner sits
above the client and drives it through this interface and ``InferenceSession`` settings only.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from swarm.client.config import ClientConfig

GROUP = "swarm.planners"
T = TypeVar("T")


class RequestPlanner(Protocol):
    def generate(self, run: Callable[[ClientConfig], T], batch_size: int, prompt_length: int,
                 new_tokens: int) -> T:
        """Call ``run(settings)`` once (a plain ``generate`` in a session with those settings) and return its
        result; the settings are a copy of the client's config, never the shared one."""


def load_planner(name: str, model: object) -> RequestPlanner:
    """The planner ``name`` for ``model`` (a distributed model), from the installed entry points."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in found:
        raise ValueError(f"no request planner {name!r} is installed (entry point group {GROUP}: "
                         f"{', '.join(sorted(found)) or 'none'}); reinstall the project (pip install -e .)")
    return found[name].load()(model)
