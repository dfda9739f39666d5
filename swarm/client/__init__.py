"""The client role: models whose blocks run in the swarm.

- model.py: ``AutoDistributedModelForCausalLM`` / ``AutoDistributedModel`` / ``AutoDistributedSpeculativeModel`` /
  ``AutoDistributedModelForSequenceClassification`` and their classes (drop-in transformers)
- remote_sequential.py: ``RemoteSequential``: every decoder block as one module computed by servers
- speculative.py: greedy speculative decoding in a session: ``PromptLookup`` and ``DraftModel`` proposers, drafts
  checked several per step, caches rewound past the first wrong one (``generate(..., prompt_lookup_num_tokens=k)``,
  ``assistant_model=``, ``AutoDistributedSpeculativeModel``)
- inference_session.py: ``InferenceSession``: streaming steps over servers' KV caches, replay on failure
- chain.py: the chain core of every request kind: ``open_chain``, ``ChainHop`` (a server's session, its stream and
  receipts), ``Attempts`` (one failure budget and fault rule), ``output_codec`` (8-bit between servers, float16 at
  the ends)
- hop_session.py: ``HopSession``: one server's part of an inference session (its steps, links, inputs sent)
- trace.py: ``Trace``: per-step timelines of a session (``generate(..., trace=True)`` or ``SWARM_TRACE=1``)
- verification.py: redundant execution: a span's output recomputed by another server, strikes on disagreement
- proofs.py: ``ProofChecker``: challenged forward hops (``zk_probability``), their proofs fetched and checked in
  the background against the client's own circuits; strikes, and receipts withheld until proofs verify
- remote_forward.py: stateless forward/backward through a chain (training), as an autograd function
- routing.py: ``RoutingPolicy`` and the cheapest-chain search over measured costs (pure functions)
- sequence_manager.py: ``SequenceManager``: the DHT view, RTT pings, per-server statistics, bans with backoff
- node.py: ``ClientNode``: the p2pd, DHT node and event loop a process's models of one swarm share (refcounted)
- diffusion.py: ``RemoteUNet``: a diffusers U-Net whose blocks run in the swarm (U-shaped: skips stay on servers),
  one ``LevelsHop`` per server
- unet_autograd.py: a ``RemoteUNet`` call that needs gradients: recorded evaluations and the backward through
  the servers (``TrainingSession``), as an autograd function
- pipeline.py: ``AutoDistributedPipeline``: a diffusers pipeline with a ``RemoteUNet``; ``latent_shift_pipeline``,
  ``i2vgenxl_pipeline`` (I2VGenXL with working defaults: clip skip, seeded image latents)
- config.py: ``ClientConfig``
- planner.py: ``RequestPlanner`` and ``load_planner``: plugins (entry point group ``swarm.planners``) that choose
  each ``generate``'s settings and record how it went
"""

from swarm.client.config import ClientConfig
from swarm.client.diffusion import RemoteUNet
from swarm.client.inference_session import InferenceSession
from swarm.client.model import (
    AutoDistributedModel,
    AutoDistributedModelForCausalLM,
    AutoDistributedModelForSequenceClassification,
    AutoDistributedSpeculativeModel,
    DistributedModel,
    DistributedModelForCausalLM,
    DistributedModelForSequenceClassification,
)
from swarm.client.pipeline import AutoDistributedPipeline
from swarm.client.remote_sequential import RemoteSequential
from swarm.client.routing import MissingBlocksError, RemoteSpan, RouteRequest, RoutingPolicy

__all__ = [
    "AutoDistributedPipeline",
    "RemoteUNet",
    "AutoDistributedModel",
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "AutoDistributedSpeculativeModel",
    "ClientConfig",
    "DistributedModel",
    "DistributedModelForCausalLM",
    "DistributedModelForSequenceClassification",
    "InferenceSession",
    "MissingBlocksError",
    "RemoteSequential",
    "RemoteSpan",
    "RouteRequest",
    "RoutingPolicy",
]
