"""swarm: run large models' blocks on volunteers' machines, Petals-style.

Subpackages: ``dht`` (announcements), ``blocks`` (what a block is per model family), ``server``, ``client``,
``rpc`` (wire protocol), ``compression`` (tensor codecs), ``hub`` (where model files come from).
"""

__version__ = "0.1.0"

import logging  # noqa: E402

# bitsandbytes, imported by diffusers and our codecs, warns at import about an optional 4-bit CPU kernel package.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from swarm.blocks.latent_shift import LatentShiftUNet  # noqa: E402
from swarm.blocks.span import BlockSpan  # noqa: E402
from swarm.client import (  # noqa: E402
    AutoDistributedModel,
    AutoDistributedModelForCausalLM,
    AutoDistributedPipeline,
    ClientConfig,
    DistributedModel,
    DistributedModelForCausalLM,
    InferenceSession,
    MissingBlocksError,
    RemoteSequential,
    RemoteUNet,
    RoutingPolicy,
)
from swarm.hub.embedded import EMBEDDED_MODEL  # noqa: E402
from swarm.hub.source import load_tokenizer, resolve_model  # noqa: E402
from swarm.rpc.client import RemoteError  # noqa: E402

__all__ = [
    "EMBEDDED_MODEL",
    "AutoDistributedModel",
    "AutoDistributedPipeline",
    "LatentShiftUNet",
    "RemoteUNet",
    "AutoDistributedModelForCausalLM",
    "BlockSpan",
    "ClientConfig",
    "DistributedModel",
    "DistributedModelForCausalLM",
    "InferenceSession",
    "MissingBlocksError",
    "RemoteError",
    "RemoteSequential",
    "RoutingPolicy",
    "load_tokenizer",
    "resolve_model",
]
