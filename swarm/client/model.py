"""Drop-in transformers models whose decoder blocks run in the swarm.

The client keeps the token embeddings (and learned positions, for GPT-2), the final norm and the LM head; servers
never see token ids. ``DistributedModelForCausalLM`` is a ``PreTrainedModel`` + ``GenerationMixin``: ``generate``
opens an inference session over the servers' KV caches, ``forward`` with ``labels`` trains local parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss, ForSequenceClassificationLoss
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from swarm.blocks import compat
from swarm.blocks.checkpoint import Checkpoint
from swarm.blocks.families import BlockFamily, family_for
from swarm.blocks.span import SERIAL_POSITIONS, BlockSpan, build_skeleton, load_config, span_config
from swarm.blocks.weights import reference_weights
from swarm.client import speculative
from swarm.client.config import ClientConfig
from swarm.client.inference_session import InferenceSession
from swarm.client.planner import load_planner
from swarm.client.proofs import ProofChecker
from swarm.client.remote_sequential import RemoteSequential
from swarm.client.routing import RemoteSpan, RouteRequest
from swarm.client.trace import Trace, enabled_by_env
from swarm.client.verification import LocalArbiter
from swarm.hub.source import ModelSource, default_model_id, resolve_model
from swarm.utils.threads import torch_threads_of_this_thread

logger = logging.getLogger(__name__)

DEFAULT_DRAFT_TOKENS = 4  # drafted tokens checked per step when the caller does not say


def _load_local_modules(config: PretrainedConfig, family: BlockFamily, source: ModelSource, checkpoint: Checkpoint,
                        dtype: torch.dtype, lm_head: bool = True) -> dict[str, nn.Module | None]:
    """The parts the client keeps, loaded from just the checkpoint shards that hold them (``lm_head``: the
    causal LM's head too)."""
    skeleton = build_skeleton(span_config(config, 0, 0))  # the model's classes without any decoder layer
    paths = {"embed_tokens": family.embed_tokens, "position_embeddings": family.position_embeddings,
             "norm": family.norm, "lm_head": family.lm_head if lm_head else None}
    modules: dict[str, nn.Module | None] = {}
    for role, path in paths.items():
        if path is None:
            modules[role] = None
            continue
        module = skeleton.get_submodule(path).to(dtype).to_empty(device="cpu")
        if role == "lm_head" and (config.tie_word_embeddings or not checkpoint.has_module(path)):
            module.weight = modules["embed_tokens"].weight  # tied; such checkpoints often omit lm_head.weight
            state = checkpoint.load_module(path, dtype) if checkpoint.has_module(path) else {}
            missing, _ = module.load_state_dict({k: v for k, v in state.items() if k != "weight"}, strict=False)
            if set(missing) - {"weight"}:
                raise KeyError(f"checkpoint of {source.name} lacks {sorted(set(missing) - {'weight'})} of {path}")
        else:
            module.load_state_dict(checkpoint.load_module(path, dtype))
        modules[role] = module
    return modules


class DistributedPreTrainedModel(PreTrainedModel):
    config_class = PretrainedConfig
    base_model_prefix = "model"
    _supports_sdpa = True

    _uses_lm_head = True  # the causal LM's output head is among the local parts
    # from_pretrained keywords that set the model's config: prompt tuning (Petals' names), a classifier's labels
    _config_options: tuple[str, ...] = ("tuning_mode", "pre_seq_len")

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every local weight comes from the checkpoint

    @classmethod
    def _load_heads(cls, config: PretrainedConfig, source: ModelSource, checkpoint: Checkpoint,
                    dtype: torch.dtype) -> dict[str, nn.Module]:
        """Task heads of this class beyond the causal LM's (e.g. a classifier), by name."""
        return {}

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | os.PathLike | None = None, *,
                        initial_peers: Sequence[str] = (), model_id: str | None = None,
                        client_config: ClientConfig | None = None, dtype: torch.dtype | str = torch.float32,
                        **client_options: object):
        """Load the local parts of a model and connect to the swarm serving its blocks.

        ``model_name_or_path``: a local directory or a hub name; None means the embedded default model.
        ``initial_peers``: multiaddrs of any swarm node. ``model_id``: the model's DHT name if it differs from the
        default (the hub name, or the local directory's name). Other keywords set ``ClientConfig`` fields.
        ``dtype`` of the local parts: a torch dtype or its name; ``torch_dtype=`` (transformers' and Petals' older
        name) is accepted too.
        """
        if "torch_dtype" in client_options:
            dtype = client_options.pop("torch_dtype")
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"dtype {dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
            dtype = getattr(torch, dtype)
        overrides = {name: client_options.pop(name) for name in cls._config_options if name in client_options}
        client_config = ClientConfig.with_options(client_config, initial_peers, client_options)
        source = resolve_model(model_name_or_path)
        config = load_config(source)
        for name, value in overrides.items():
            setattr(config, name, value)
        model_id = model_id or client_config.model_id or default_model_id(model_name_or_path)
        checkpoint = Checkpoint(source)
        modules = _load_local_modules(config, family_for(config), source, checkpoint, dtype, cls._uses_lm_head)
        modules.update(cls._load_heads(config, source, checkpoint, dtype))
        k = client_config.local_blocks
        if not 0 <= k < config.num_hidden_layers:
            raise ValueError(f"local_blocks must be in [0, {config.num_hidden_layers}), got {k}")
        modules["local_span"] = BlockSpan.from_pretrained(source, 0, k, dtype=dtype) if k else None
        if client_config.require_weights is not None:  # checked here: a bad value fails before any request
            reference = reference_weights(client_config.require_weights, source)
            client_config.routing_policy = dataclasses.replace(client_config.routing_policy,
                                                               reference_weights=reference)
        remote = RemoteSequential(client_config, model_id, config.num_hidden_layers, first_block=k)
        model = cls._assemble(config, modules, remote)
        try:
            model.generation_config = GenerationConfig.from_pretrained(source.config_path)
        except OSError:
            model.generation_config = GenerationConfig.from_model_config(config)
        model.name_or_path = source.name
        model._source, model._local_dtype = source, dtype  # for loading other local spans (acceleration methods)
        if client_config.zk_probability > 0:
            if not client_config.zk_directory:
                raise ValueError("zk_probability needs zk_directory: where the client keeps its circuits and keys")
            remote.manager.proofs = ProofChecker(remote.manager, source, client_config.zk_directory,
                                                 client_config.zk_srs)
        if client_config.arbitration_blocks > 0:
            remote.manager.arbiter = LocalArbiter(source, client_config.arbitration_blocks)
        if client_config.acceleration is not None:  # a plugin (swarm/client/planner.py); loaded only when asked for
            model._selector = load_planner("acceleration", model)
        return model.eval()

    def local_span_of(self, blocks: int) -> BlockSpan | None:
        """The first ``blocks`` blocks as a local span (None for 0), loaded once per size."""
        if not blocks:
            return None
        spans = self.__dict__.setdefault("_local_spans", {})
        if blocks not in spans:
            spans[blocks] = BlockSpan.from_pretrained(self._source, 0, blocks, dtype=self._local_dtype)
        return spans[blocks]

    def shutdown(self) -> None:
        """Stop this client's libp2p daemon (also done at interpreter exit)."""
        self.get_remote().shutdown()

    def get_remote(self) -> RemoteSequential:
        raise NotImplementedError

    @contextlib.contextmanager
    def inference_session(self, max_length: int, config: ClientConfig | None = None) -> Iterator[InferenceSession]:
        """Keep the servers' KV caches across calls, e.g. several ``generate`` calls of a multi-turn chat.
        ``config``: settings for this session alone (see ``RemoteSequential.inference_session``), including how many
        first blocks the client computes itself (``local_blocks``)."""
        remote = self.get_remote()
        base = self if isinstance(self, DistributedModel) else self.model
        if base.tuning_mode is not None:  # the learned prompt takes positions of the servers' caches too
            max_length += base.pre_seq_len
        with remote.inference_session(max_length, config) as session:
            if session.first_block != remote.manager.first_block:
                session.local_span = self.local_span_of(session.first_block)
            yield session

    def use_adapter(self, name: str | None) -> contextlib.AbstractContextManager[None]:
        """``with model.use_adapter("name"):`` requests this thread starts inside run with that LoRA adapter (None:
        the base model); outside, the ``active_adapter`` given to ``from_pretrained`` applies."""
        return self.get_remote().use_adapter(name)

    def route(self) -> list[RemoteSpan]:
        """The chain of servers a decoding session would take now."""
        return self.get_remote().route()

    def explain_route(self, request: RouteRequest | None = None) -> list[dict]:
        """The chain a request would take now, each hop with its expected costs in seconds (network, compute,
        queue, overhead, reliability, total; network split into the trip of its input and of its output to the
        client, which with push depend on its neighbours), for people and for the health page. The totals add up
        to the chain's cost. By default, a decoding step's chain (pushed if the client's config says so)."""
        return [hop.explain() for hop in self.get_remote().explain_route(request)]


class DistributedModel(DistributedPreTrainedModel):
    """Token embeddings -> remote blocks -> final norm: the last hidden states, like ``AutoModel``."""

    def __init__(self, config: PretrainedConfig, *, embed_tokens: nn.Module, norm: nn.Module, layers: RemoteSequential,
                 position_embeddings: nn.Module | None = None, local_span: BlockSpan | None = None):
        super().__init__(config)
        self.family = family_for(config)
        self.embed_tokens, self.position_embeddings, self.norm, self.layers = (
            embed_tokens, position_embeddings, norm, layers)
        self.local_span = local_span  # the first blocks, when the client keeps them (``local_blocks``)
        self.tuning_mode = getattr(config, "tuning_mode", None)
        self.pre_seq_len = getattr(config, "pre_seq_len", None) or 0
        if self.tuning_mode is not None:
            self._add_prompts()

    def _add_prompts(self) -> None:
        """Trainable prompts (Petals' prompt tuning): ``ptune`` prepends ``pre_seq_len`` learned embeddings to the
        input; ``deep_ptune`` also adds learned vectors to those positions before every remote block (the servers
        add them; gradients come back with the backward)."""
        if self.tuning_mode not in ("ptune", "deep_ptune"):
            raise ValueError(f"tuning_mode must be 'ptune' or 'deep_ptune', got {self.tuning_mode!r}")
        if self.pre_seq_len <= 0:
            raise ValueError(f"prompt tuning needs pre_seq_len > 0, got {self.pre_seq_len}")
        if self.tuning_mode == "deep_ptune" and self.local_span is not None:
            raise ValueError("deep_ptune with local_blocks is not supported: deep prompts go to remote blocks only")
        hidden, dtype = self.config.hidden_size, self.embed_tokens.weight.dtype
        std = getattr(self.config, "initializer_range", 0.02)
        self.prompt_embeddings = nn.Embedding(self.pre_seq_len, hidden, dtype=dtype)
        nn.init.normal_(self.prompt_embeddings.weight, std=std)
        if self.tuning_mode == "deep_ptune":
            blocks = self.layers.end - self.layers.start
            # zeros: before training, deep prompts change nothing beyond the shallow prompt
            self.intermediate_prompt_embeddings = nn.Embedding(self.pre_seq_len, blocks * hidden, dtype=dtype)
            nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    def _deep_prompts(self) -> torch.Tensor | None:
        """(blocks, 1, pre_seq_len, hidden): what the servers add before each block."""
        if self.tuning_mode != "deep_ptune":
            return None
        weight = self.intermediate_prompt_embeddings.weight
        return weight.view(self.pre_seq_len, -1, self.config.hidden_size).permute(1, 0, 2).unsqueeze(1)

    @classmethod
    def _assemble(cls, config: PretrainedConfig, modules: dict, remote: RemoteSequential) -> DistributedModel:
        return cls(config, embed_tokens=modules["embed_tokens"], norm=modules["norm"], layers=remote,
                   position_embeddings=modules["position_embeddings"], local_span=modules.get("local_span"))

    def get_remote(self) -> RemoteSequential:
        return self.layers

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        session = self.layers.active_session
        prepended = False  # this call puts the learned prompt first (a forward pass, or a session's first step)
        if self.tuning_mode is not None:
            if session is None or session.position == 0:
                inputs_embeds, attention_mask, position_ids = self._prepend_prompts(inputs_embeds, attention_mask,
                                                                                    position_ids)
                prepended = True
            elif session.prefix != self.pre_seq_len:
                raise ValueError(f"this inference session does not start with this model's prompt of "
                                 f"{self.pre_seq_len} positions (it holds {session.prefix}): start it again from "
                                 f"position 0")
            else:  # the session already holds the prompt: the caller's positions and mask come after it
                if attention_mask is not None:
                    attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], self.pre_seq_len),
                                                attention_mask], dim=1)
                if position_ids is not None:
                    position_ids = position_ids + self.pre_seq_len
        batch, tokens = inputs_embeds.shape[:2]
        past = session.position if session is not None else 0
        if attention_mask is not None and attention_mask.shape != (batch, past + tokens):
            raise ValueError(f"attention_mask must cover the {past} cached and {tokens} new positions: expected shape "
                             f"({batch}, {past + tokens}), got {tuple(attention_mask.shape)}")
        if position_ids is None:  # as transformers' models do; generate() passes padding-aware positions
            position_ids = torch.arange(past, past + tokens).expand(batch, tokens)
        hidden = inputs_embeds
        if self.position_embeddings is not None:
            hidden = hidden + self.position_embeddings(position_ids)
        local_span = self.local_span
        if session is not None and session.first_block != self.layers.manager.first_block:
            local_span = session.local_span  # this session keeps another number of blocks on the client
        if local_span is not None:
            adapter = session.adapter if session is not None else self.layers.active_adapter
            if adapter is not None:  # the client's own blocks are the base model's
                raise ValueError(f"adapter {adapter!r} runs on servers only: use it with local_blocks=0")
            cache = None
            if session is not None:
                if session.local_cache is None:
                    session.local_cache = local_span.new_cache()
                cache = session.local_cache
                compat.truncate_cache(cache, past)  # drops what a step that failed remotely left behind
            hidden = local_span(hidden, position_ids, attention_mask, cache)
        if prepended:
            hidden = self.layers(hidden, position_ids, attention_mask, prompts=self._deep_prompts())
            hidden = hidden[:, self.pre_seq_len:]  # the caller's positions only
            if session is not None:
                session.prefix = self.pre_seq_len
        else:
            hidden = self.layers(hidden, position_ids, attention_mask)
        if session is not None:
            if input_ids is not None and (past == 0 or session.token_ids is not None):
                session.token_ids = input_ids if past == 0 else torch.cat([session.token_ids, input_ids], dim=1)
            else:
                session.token_ids = None  # positions fed as embeddings: token history unknown from here on
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden))


    def _prepend_prompts(self, embeds: torch.Tensor, mask: torch.Tensor | None,
                         positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                  torch.Tensor | None]:
        """The learned prompt before every row, the mask and positions extended over it."""
        batch, pre = embeds.shape[0], self.pre_seq_len
        embeds = torch.cat([self.prompt_embeddings.weight.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        if mask is not None:
            mask = torch.cat([torch.ones(batch, pre, dtype=mask.dtype, device=mask.device), mask], dim=1)
        if positions is not None:
            positions = torch.cat([torch.arange(pre, device=positions.device).expand(batch, -1), positions + pre],
                                  dim=1)
        return embeds, mask, positions


class _DistributedModelWithHead(DistributedPreTrainedModel):
    """A ``DistributedModel`` (``self.model``) under a task head kept on the client."""

    def get_remote(self) -> RemoteSequential:
        return self.model.layers

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens


class DistributedModelForCausalLM(_DistributedModelWithHead, GenerationMixin):
    """A causal LM whose decoder blocks run in the swarm; ``generate`` and training work as in transformers."""

    def __init__(self, config: PretrainedConfig, *, model: DistributedModel, lm_head: nn.Module):
        super().__init__(config)
        self.model, self.lm_head = model, lm_head

    @classmethod
    def _assemble(cls, config: PretrainedConfig, modules: dict,
                  remote: RemoteSequential) -> DistributedModelForCausalLM:
        return cls(config, model=DistributedModel._assemble(config, modules, remote), lm_head=modules["lm_head"])

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the KV cache lives on the servers, inside an inference session

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0,
                **kwargs: object) -> CausalLMOutputWithPast:
        reference = input_ids if input_ids is not None else inputs_embeds
        positions = reference.shape[:2].numel() if reference is not None else SERIAL_POSITIONS + 1
        # A decode step's local parts (embeddings, final norm, LM head) read whole matrices for little arithmetic:
        # on one thread they take the same time, and a thread pool would wait for a worker the scheduler gave to a
        # server taking its turn on the same cores (swarm/server/compute.py)
        with torch_threads_of_this_thread(1) if positions <= SERIAL_POSITIONS else contextlib.nullcontext():
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds).last_hidden_state
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        step_times = self.__dict__.get("_step_times")
        if step_times is not None and not step_times:  # the prefill is done: time to first token, for the selector
            step_times.append(time.perf_counter())
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits, labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def generate(self, inputs: torch.Tensor | None = None, *args, trace: bool | None = None, **kwargs):
        """transformers' ``generate``, inside an inference session (a new one unless one is active); with an
        ``acceleration`` setting, under the method it names or the one chosen for this request ("auto").

        ``trace=True`` (or ``SWARM_TRACE=1``, which also prints it) records each step's timeline in
        ``model.last_trace`` (``swarm.client.trace.Trace``: client compute, hand-over, encoding, and per hop the
        server's queue, compute and encoding and the transport around them)."""
        trace = enabled_by_env() if trace is None else trace
        remote = self.get_remote()
        if "active_adapter" in kwargs:  # this call's LoRA adapter (Petals' and peft's name)
            adapter = kwargs.pop("active_adapter")
            session = kwargs.get("session") or remote.active_session
            if session is not None and session.adapter != adapter:
                raise ValueError(f"this inference session runs with adapter {session.adapter!r}, not {adapter!r}: "
                                 f"open the session inside model.use_adapter({adapter!r})")
            with remote.use_adapter(adapter):
                return self.generate(inputs, *args, trace=trace, **kwargs)
        lookup, assistant = kwargs.pop("prompt_lookup_num_tokens", None), kwargs.pop("assistant_model", None)
        assistant = assistant if assistant is not None else self.__dict__.get("small_model")
        if lookup or assistant is not None:  # transformers' and Petals' speculative spellings
            return self._generate_speculatively(inputs, kwargs, lookup, assistant, trace)
        given = kwargs.pop("session", None)  # Petals' generate(..., session=sess)
        if given is not None and given is not remote.active_session:
            with remote.using_session(given):
                return self.generate(inputs, *args, trace=trace, **kwargs)
        session = remote.active_session
        if session is not None:
            if inputs is None and "input_ids" not in kwargs and "inputs_embeds" not in kwargs and session.position:
                inputs = self._session_history(session, kwargs)  # Petals' generate(None): go on from the last token
            lookup = session.config.prompt_lookup_tokens
            if lookup and not args and self._speculable(inputs, kwargs):
                return self._generate_speculatively(inputs, kwargs, lookup, None, trace)
            with self._tracing(session, trace), self._serial_generation(inputs, kwargs):
                result = super().generate(inputs, *args, **kwargs)
            sequences = result if isinstance(result, torch.Tensor) else getattr(result, "sequences", None)
            session.output_ids = sequences if isinstance(sequences, torch.Tensor) else None
            return result
        max_length = self._generation_length(inputs, kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        speculable = not args and self._speculable(prompt, kwargs)

        def run(config: ClientConfig | None = None):
            lookup = (config or remote.manager.config).prompt_lookup_tokens
            with self.inference_session(max_length, config) as session:
                if lookup and speculable:  # prompt-lookup drafts (the setting, or an acceleration method's)
                    return self._generate_speculatively(prompt, kwargs, lookup, None, trace)
                with self._tracing(session, trace), self._serial_generation(inputs, kwargs):
                    return super(DistributedModelForCausalLM, self).generate(inputs, *args, **kwargs)

        selector = self.__dict__.get("_selector")
        if selector is None or prompt is None:
            return run()
        batch, length = prompt.shape[:2]
        return selector.generate(run, batch, length, max_length - length, speculable)

    def _speculable(self, prompt: torch.Tensor | None, kwargs: dict) -> bool:
        """Whether speculation could serve this request with the very output it asked for."""
        try:
            speculative.check_greedy(self, prompt, kwargs)
        except ValueError:
            return False
        return True

    def _generate_speculatively(self, inputs: torch.Tensor | None, kwargs: dict, lookup: int | None,
                                assistant: nn.Module | None, trace: bool) -> torch.Tensor:
        """Greedy generation with drafts checked by the swarm several at a time (speculative.py): from the text
        itself with ``prompt_lookup_num_tokens=k``, or from a small local model (``assistant_model=``, or the
        ``small_model`` of ``AutoDistributedSpeculativeModel``); the output equals plain greedy generation."""
        remote = self.get_remote()
        given = kwargs.pop("session", None)
        draft_tokens = kwargs.pop("num_assistant_tokens", None) or lookup or DEFAULT_DRAFT_TOKENS
        session = given or remote.active_session
        if session is not None and inputs is None and kwargs.get("input_ids") is None and session.position:
            inputs = self._session_history(session, kwargs)  # generate(None): go on from the newest token
        inputs = inputs if inputs is not None else kwargs.get("input_ids")
        speculative.check_greedy(self, inputs, kwargs)
        config = kwargs.get("generation_config") or self.generation_config
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        max_length = self._generation_length(inputs, kwargs)
        propose = speculative.PromptLookup() if assistant is None else speculative.DraftModel(assistant)
        with contextlib.ExitStack() as stack:
            if session is None:
                session = stack.enter_context(self.inference_session(max_length))
            elif session is not remote.active_session:
                stack.enter_context(remote.using_session(session))
            stack.enter_context(self._tracing(session, trace))
            out, self.last_speculation = speculative.generate_speculatively(
                self, inputs, propose, draft_tokens, max_length - inputs.shape[1], eos)
        return out

    @staticmethod
    def _session_history(session: InferenceSession, kwargs: dict) -> torch.Tensor:
        """The token ids the session holds and the newest one generated, to continue from it (with the mask)."""
        known, last, mask = session.token_ids, session.output_ids, session.attention_mask
        if known is None or known.shape[1] != session.position - session.prefix:
            raise ValueError("generate(None) continues the inference session from its last token, but the session "
                             "was fed embeddings, so its token ids are unknown: pass the ids to continue from")
        ids = known
        if last is not None and last.shape[0] == known.shape[0] and last.shape[1] == known.shape[1] + 1 \
                and torch.equal(last[:, :-1], known):  # the newest generated token, not fed yet
            ids = last
            mask = None if mask is None else torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if mask is not None:
            kwargs.setdefault("attention_mask", mask)
        return ids

    @contextlib.contextmanager
    def _tracing(self, session: InferenceSession, enabled: bool) -> Iterator[None]:
        if not enabled:
            yield
            return
        previous, session.trace = session.trace, Trace()
        try:
            yield
        finally:
            self.last_trace, session.trace = session.trace, previous
            if enabled_by_env():
                self.last_trace.print()

    def _serial_generation(self, inputs: torch.Tensor | None, kwargs: dict) -> contextlib.AbstractContextManager:
        """Generation of up to ``SERIAL_POSITIONS`` rows (beams included) runs its per-token work (the LM head,
        logits processors, sampling) on the caller's thread alone, as ``forward`` runs a decode step's local parts:
        between two steps, a thread pool's worker has gone to sleep and first waits for a core that a server may hold
        (SmolLM2, two servers, 2 cores: ~1.5 ms -> ~3-5 ms of generate's own work per token with the pool). Not when
        the client runs blocks itself (``local_blocks``): their prefill is real arithmetic."""
        config = kwargs.get("generation_config") or self.generation_config
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        beams = max(kwargs.get("num_beams", config.num_beams) or 1,
                    kwargs.get("num_return_sequences", config.num_return_sequences) or 1)
        if prompt is None or prompt.dim() < 2 or prompt.shape[0] * beams > SERIAL_POSITIONS \
                or self.model.local_span is not None:
            return contextlib.nullcontext()
        return torch_threads_of_this_thread(1)

    def _generation_length(self, inputs: torch.Tensor | None, kwargs: dict) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        prompt_length = prompt.shape[1] if prompt is not None else 1
        max_new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if max_new_tokens is not None:
            return prompt_length + max_new_tokens
        return max(kwargs.get("max_length", config.max_length) or 0, prompt_length + 1)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                                      position_ids: torch.LongTensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> dict:
        """Feed only the positions the session has not seen; rewind or reorder it if the history changed."""
        session = self.get_remote().active_session
        if inputs_embeds is not None and session.position == 0:
            new = {"inputs_embeds": inputs_embeds}
            tokens = inputs_embeds.shape[1]
        elif inputs_embeds is not None and session.token_ids is None:
            # Generating from embeddings: input_ids holds only the tokens generated after them.
            tokens = inputs_embeds.shape[1] + input_ids.shape[1] - (session.position - session.prefix)
            if not 0 < tokens <= input_ids.shape[1]:
                raise ValueError(f"the session holds {session.position - session.prefix} positions, which does not "
                                 f"match "
                                 f"{inputs_embeds.shape[1]} embedded + {input_ids.shape[1]} generated positions")
            new = {"input_ids": input_ids[:, input_ids.shape[1] - tokens:]}
        else:
            start = self._sync_session(session, input_ids)
            new = {"input_ids": input_ids[:, start:]}
            tokens = input_ids.shape[1] - start
        new["attention_mask"] = attention_mask
        if position_ids is not None:
            new["position_ids"] = position_ids[:, -tokens:]
        if "logits_to_keep" in kwargs:  # generate asks for the last position's logits only: SmolLM2's LM head
            new["logits_to_keep"] = kwargs["logits_to_keep"]  # takes 10 ms for one position, 63 ms for 128
        return new

    @staticmethod
    def _sync_session(session: InferenceSession, input_ids: torch.LongTensor) -> int:
        """Where ``input_ids`` continue the session: reorders rows for beam search, rewinds on a changed history."""
        known = session.token_ids  # (after the learned prompt of a prompt-tuned model: ``prefix`` positions)
        if known is None:  # nothing cached yet, or a history fed as embeddings: continue after it
            return session.position - session.prefix
        if input_ids.shape[0] != known.shape[0]:
            raise ValueError(f"batch size changed within an inference session ({known.shape[0]} -> "
                             f"{input_ids.shape[0]})")
        cached = known.shape[1]
        if input_ids.shape[1] > cached:
            prefix = input_ids[:, :cached]
            if torch.equal(prefix, known):
                return cached
            matches = (prefix[:, None, :] == known[None, :, :]).all(-1)  # [new row, old row]
            if matches.any(1).all():  # beam search picked (possibly repeated) old rows
                session.reorder(matches.long().argmax(1))
                return cached
        # The history changed: keep the longest common prefix, recompute at least the last token.
        limit = min(input_ids.shape[1] - 1, cached)
        same = (input_ids[:, :limit] == known[:, :limit]).all(0)
        common = int(same.long().cumprod(0).sum())
        session.rewind(session.prefix + common)
        return common


class DistributedModelForSequenceClassification(_DistributedModelWithHead):
    """A sequence classifier whose decoder blocks run in the swarm: embeddings, final norm and the ``score`` head
    stay on the client, which trains the head (and any other local parameter) through the servers' backward."""

    _uses_lm_head = False
    _config_options = (*DistributedPreTrainedModel._config_options, "num_labels", "problem_type", "id2label",
                       "label2id", "pad_token_id")

    def __init__(self, config: PretrainedConfig, *, model: DistributedModel, score: nn.Linear):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model, self.score = model, score

    @classmethod
    def _load_heads(cls, config: PretrainedConfig, source: ModelSource, checkpoint: Checkpoint,
                    dtype: torch.dtype) -> dict[str, nn.Module]:
        score = nn.Linear(config.hidden_size, config.num_labels, bias=False, dtype=dtype)
        if checkpoint.has_module("score"):  # a classifier's checkpoint (``...ForSequenceClassification``)
            score.load_state_dict(checkpoint.load_module("score", dtype))
        else:  # a base or causal LM checkpoint: a new head, to be trained, as transformers does
            logger.warning(f"{source.name} has no classification head: 'score' is newly initialized; train it")
            nn.init.normal_(score.weight, std=getattr(config, "initializer_range", 0.02))
        return {"score": score}

    @classmethod
    def _assemble(cls, config: PretrainedConfig, modules: dict,
                  remote: RemoteSequential) -> DistributedModelForSequenceClassification:
        return cls(config, model=DistributedModel._assemble(config, modules, remote), score=modules["score"])

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs: object) -> SequenceClassifierOutputWithPast:
        """As transformers' ``...ForSequenceClassification``: each row is classified by its last real token (the
        last one the attention mask keeps, else the last that is not padding)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.score(hidden)
        batch, length = logits.shape[:2]
        positions = torch.arange(length, device=logits.device)
        if attention_mask is not None:
            last = (positions * attention_mask[:, -length:].to(torch.long)).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            last = (positions * (input_ids != self.config.pad_token_id).long()).argmax(-1)
        else:
            if batch > 1 and input_ids is None:
                logger.warning("classifying rows of embeddings by their last position: pass an attention_mask if "
                               "some are padded")
            last = torch.full((batch,), length - 1, device=logits.device)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = ForSequenceClassificationLoss(labels, pooled, self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)


class AutoDistributedModelForSequenceClassification:
    """``AutoDistributedModelForSequenceClassification.from_pretrained(MODEL, initial_peers=[...], num_labels=N)``:
    a drop-in sequence classifier (local head, remote blocks)."""

    @staticmethod
    def from_pretrained(model_name_or_path: str | os.PathLike | None = None,
                        **kwargs) -> DistributedModelForSequenceClassification:
        """``num_labels=``: the classes of a new head (a classifier's checkpoint already says how many)."""
        return DistributedModelForSequenceClassification.from_pretrained(model_name_or_path, **kwargs)


class AutoDistributedSpeculativeModel:
    """``AutoDistributedSpeculativeModel.from_pretrained(MODEL, small_model=draft, initial_peers=[...])`` (Petals'
    name): a causal LM whose greedy ``generate`` checks the drafts of ``draft``, a small local causal LM with the
    same tokenizer, several tokens per swarm step; the output is that of plain greedy generation."""

    @staticmethod
    def from_pretrained(model_name_or_path: str | os.PathLike | None = None, *, small_model: nn.Module,
                        **kwargs) -> DistributedModelForCausalLM:
        model = DistributedModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
        model.__dict__["small_model"] = small_model  # not a submodule: its weights are not the model's
        return model


class AutoDistributedModel:
    """``AutoDistributedModel.from_pretrained(MODEL, initial_peers=[...])``: hidden states, blocks in the swarm."""

    @staticmethod
    def from_pretrained(model_name_or_path: str | os.PathLike | None = None, **kwargs) -> DistributedModel:
        return DistributedModel.from_pretrained(model_name_or_path, **kwargs)


class AutoDistributedModelForCausalLM:
    """``AutoDistributedModelForCausalLM.from_pretrained(MODEL, initial_peers=[...])``: a drop-in causal LM."""

    @staticmethod
    def from_pretrained(model_name_or_path: str | os.PathLike | None = None, **kwargs) -> DistributedModelForCausalLM:
        return DistributedModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
