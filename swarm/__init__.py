"""swarm: run large models' blocks on volunteers' machines, Petals-style.

Subpackages: ``dht`` (announcements), ``blocks`` (what a block is per model family), ``server``, ``client``,
``rpc`` (wire protocol), ``compression`` (tensor codecs), ``hub`` (where model files come from), ``api`` (an
OpenAI-compatible HTTP gateway), ``health`` (the health page), ``acceleration`` (per-request method choice from
history), ``trust`` (checks between peers), ``settlement`` (paying for served work), ``simulation`` (a simulated
swarm without processes), ``utils`` (shared helpers). Top-level modules: chat.py (the terminal chat) and
local_swarm.py (starts real swarm processes on 127.0.0.1 and stops them by PID; used by the demo, examples,
benchmarks and tests).

The public names below are imported on first use (PEP 562): ``import swarm`` stays cheap, so command lines answer
``--help`` and argument mistakes without loading torch, transformers and diffusers first.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# How long OpenMP's idle threads spin before sleeping, read once when torch loads libgomp. Processes of a swarm take
# turns computing (a server, the next server, the client's head) on the same cores, and libgomp's default spin
# (300,000 rounds, a few ms) kept the previous process's idle threads burning the cores the next one computes on:
# 15 SmolLM2 layers took ~26 ms per decode step in two processes taking turns, ~20 ms with 20,000 rounds (which
# still spans the gaps between the parallel regions of one step). Only set when the user has not, and only if
# torch is not loaded yet (see swarm/utils/threads.py).
if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")

# bitsandbytes, imported by diffusers and our codecs, warns at import about an optional 4-bit CPU kernel package.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

_EXPORTS = {  # public name -> the module that defines it
    "EMBEDDED_MODEL": "swarm.hub.embedded",
    "AutoDistributedModel": "swarm.client",
    "AutoDistributedPipeline": "swarm.client",
    "LatentShiftUNet": "swarm.blocks.latent_shift",
    "RemoteUNet": "swarm.client",
    "AutoDistributedModelForCausalLM": "swarm.client",
    "AutoDistributedModelForSequenceClassification": "swarm.client",
    "AutoDistributedSpeculativeModel": "swarm.client",
    "BlockSpan": "swarm.blocks.span",
    "ClientConfig": "swarm.client",
    "DistributedModel": "swarm.client",
    "DistributedModelForCausalLM": "swarm.client",
    "DistributedModelForSequenceClassification": "swarm.client",
    "InferenceSession": "swarm.client",
    "MissingBlocksError": "swarm.client",
    "RemoteError": "swarm.rpc.client",
    "RemoteSequential": "swarm.client",
    "RoutingPolicy": "swarm.client",
    "load_tokenizer": "swarm.hub.source",
    "resolve_model": "swarm.hub.source",
}
__all__ = [  # the same names, spelled out for linters and readers (a test checks that they agree)
    "EMBEDDED_MODEL",
    "AutoDistributedModel",
    "AutoDistributedPipeline",
    "LatentShiftUNet",
    "RemoteUNet",
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "AutoDistributedSpeculativeModel",
    "BlockSpan",
    "ClientConfig",
    "DistributedModel",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "InferenceSession",
    "MissingBlocksError",
    "RemoteError",
    "RemoteSequential",
    "RoutingPolicy",
    "load_tokenizer",
    "resolve_model",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from swarm.blocks.latent_shift import LatentShiftUNet
    from swarm.blocks.span import BlockSpan
    from swarm.client import (
        AutoDistributedModel,
        AutoDistributedModelForCausalLM,
        AutoDistributedModelForSequenceClassification,
        AutoDistributedPipeline,
        AutoDistributedSpeculativeModel,
        ClientConfig,
        DistributedModel,
        DistributedModelForCausalLM,
        DistributedModelForSequenceClassification,
        InferenceSession,
        MissingBlocksError,
        RemoteSequential,
        RemoteUNet,
        RoutingPolicy,
    )
    from swarm.hub.embedded import EMBEDDED_MODEL
    from swarm.hub.source import load_tokenizer, resolve_model
    from swarm.rpc.client import RemoteError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'swarm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
