"""The routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or server-sent
events), as OpenAI answers them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from swarm.api.errors import APIError, generation_failed, install_error_handlers, invalid_body
from swarm.api.generation import Completion, Finished, Generator, Job, SamplingParams, TextDelta
from swarm.api.prompts import DEFAULT_COMPLETION_TOKENS, PromptBuilder
from swarm.api.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest, Limits

logger = logging.getLogger(__name__)

# How often a request checks whether its client is still there. A generation step takes tens of milliseconds or
# more, so a client that leaves costs the swarm at most a few steps more than this.
DISCONNECT_POLL = 0.25  # s


@dataclasses.dataclass
class Plan:
    """One request as jobs for the generator, and how their results map to the response's choices."""

    kind: str  # "text_completion" or "chat.completion"
    id: str
    model: str
    jobs: list[Job]
    choices: list[list[int]]  # choice indexes fed by each job: greedy choices of one prompt share one generation
    prompt_tokens: int
    include_usage: bool
    created: int = 0

    def __post_init__(self) -> None:
        self.created = int(time.time())

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              role: bool = False) -> dict:
        """One streamed choice update in OpenAI's chunk format."""
        if self.kind == "chat.completion":
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._object("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", [choice])

    def response(self, results: dict[int, Completion]) -> dict:
        choices = []
        for index in sorted(results):
            result = results[index]
            if self.kind == "chat.completion":
                choices.append({"index": index, "message": {"role": "assistant", "content": result.text},
                                "logprobs": None, "finish_reason": result.finish_reason})
            else:
                choices.append({"index": index, "text": result.text, "logprobs": None,
                                "finish_reason": result.finish_reason})
        return {**self._object(self.kind, choices), "usage": self.usage(results)}

    def usage(self, results: dict[int, Completion]) -> dict:
        completion_tokens = sum(result.completion_tokens for result in results.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _object(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "system_fingerprint": None}


class Gateway:
    """The endpoints over one model. ``served_names``: the model names requests may use, the first one listed."""

    def __init__(self, generator: Generator, prompts: PromptBuilder, served_names: Sequence[str], limits: Limits):
        self.generator, self.prompts, self.limits = generator, prompts, limits
        self.served_names = list(dict.fromkeys(served_names))
        self.created = int(time.time())

    # ---- routes

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model: str) -> dict:
        self._check_model(model)
        return self._model_card()

    async def completions(self, request: Request) -> Response:
        body = await self._parse(request, CompletionRequest)
        prompts = self.prompts.completion_prompts(body)
        max_new = self.prompts.max_new_tokens(body.max_tokens, [len(p) for p in prompts], DEFAULT_COMPLETION_TOKENS)
        return await self._answer(request, self._plan("text_completion", "cmpl", body, prompts, max_new), body.stream)

    async def chat_completions(self, request: Request) -> Response:
        body = await self._parse(request, ChatCompletionRequest)
        prompt = self.prompts.chat_prompt(body)
        max_new = self.prompts.max_new_tokens(body.max_new_tokens, [len(prompt)], None)
        return await self._answer(request, self._plan("chat.completion", "chatcmpl", body, [prompt], max_new),
                                  body.stream)

    # ---- request handling

    async def _parse(self, request: Request, schema: type[GenerationRequest]) -> GenerationRequest:
        # Parsed here rather than by FastAPI: any content type is read as JSON (as OpenAI does, and as `curl -d`
        # needs), and errors get OpenAI's format.
        try:
            body = schema.model_validate_json(await request.body())
        except ValidationError as e:
            raise invalid_body(e) from None
        self._check_model(body.model)
        if body.n > self.limits.max_n:
            raise APIError(400, f"Invalid 'n': at most {self.limits.max_n} choices per prompt on this gateway, got "
                                f"{body.n}", param="n")
        return body

    def _check_model(self, model: str) -> None:
        if model not in self.served_names:
            raise APIError(404, f"The model '{model}' does not exist; this gateway serves '{self.served_names[0]}'",
                           param="model", code="model_not_found")

    def _plan(self, kind: str, prefix: str, body: GenerationRequest, prompts: list[list[int]],
              max_new_tokens: int) -> Plan:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop=tuple(body.stop), ignore_eos=body.ignore_eos)
        jobs, choices = [], []
        for number, prompt in enumerate(prompts):
            indexes = [number * body.n + i for i in range(body.n)]
            if body.temperature == 0:  # greedy choices are all the same: generate once
                jobs.append(Job(prompt, params))
                choices.append(indexes)
                continue
            for i, index in enumerate(indexes):  # n samples, each with its own seed
                seed = None if body.seed is None else (body.seed + i) % 2**64
                jobs.append(Job(prompt, dataclasses.replace(params, seed=seed)))
                choices.append([index])
        return Plan(kind, f"{prefix}-{uuid.uuid4().hex}", self.served_names[0], jobs, choices,
                    sum(len(p) for p in prompts), body.include_usage)

    async def _answer(self, request: Request, plan: Plan, stream: bool) -> Response:
        cancel = threading.Event()
        watcher = asyncio.create_task(_cancel_on_disconnect(request, cancel))
        events = self.generator.run(plan.jobs, cancel)
        started = time.perf_counter()
        try:
            # Wait for the prefill even when streaming, so that a swarm failure gets a proper status code.
            first = await anext(events)
        except Exception as e:
            watcher.cancel()
            raise generation_failed(e) from None
        if stream:
            return StreamingResponse(self._stream(plan, first, events, watcher, started),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results: dict[int, Completion] = {}
        try:
            async for event in _chain(first, events):
                if isinstance(event, Finished):
                    results.update({index: event.completion for index in plan.choices[event.job]})
        except Exception as e:
            raise generation_failed(e) from None
        finally:
            watcher.cancel()
            await events.aclose()
        self._log(plan, results, started)
        return JSONResponse(plan.response(results))

    async def _stream(self, plan: Plan, first: TextDelta | Finished, events: AsyncIterator[TextDelta | Finished],
                      watcher: asyncio.Task, started: float) -> AsyncIterator[str]:
        """The response body of a streamed request. Starlette cancels it when the client disconnects; then (and
        on any early exit) the generator's cleanup sets the cancellation flag and the generations stop."""
        results: dict[int, Completion] = {}
        try:
            if plan.kind == "chat.completion":
                for index in sorted(i for indexes in plan.choices for i in indexes):
                    yield _sse(plan.chunk(index, role=True))
            async for event in _chain(first, events):
                for index in plan.choices[event.job]:
                    if isinstance(event, TextDelta) and event.text:
                        yield _sse(plan.chunk(index, event.text))
                    elif isinstance(event, Finished):
                        results[index] = event.completion
                        yield _sse(plan.chunk(index, finish_reason=event.completion.finish_reason))
            if plan.include_usage:
                yield _sse({**plan.chunk(0), "choices": [], "usage": plan.usage(results)})
            self._log(plan, results, started)
        except Exception as e:  # the status line is sent: the error goes in the stream, as OpenAI's do
            yield _sse(generation_failed(e).body())
        finally:
            watcher.cancel()
            await events.aclose()
        yield "data: [DONE]\n\n"

    def _model_card(self) -> dict:
        return {"id": self.served_names[0], "object": "model", "created": self.created, "owned_by": "swarm"}

    @staticmethod
    def _log(plan: Plan, results: dict[int, Completion], started: float) -> None:
        usage = plan.usage(results)
        reasons = ",".join(sorted({result.finish_reason for result in results.values()}))
        logger.info(f"{plan.id}: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens in "
                    f"{time.perf_counter() - started:.2f} s, finish: {reasons}")


async def _chain(first: TextDelta | Finished,
                 events: AsyncIterator[TextDelta | Finished]) -> AsyncIterator[TextDelta | Finished]:
    yield first
    async for event in events:
        yield event


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` once the client has gone (runs until the request's handling cancels it)."""
    while not cancel.is_set():
        if await request.is_disconnected():
            logger.info(f"Client of {request.url.path} disconnected; stopping its generation")
            cancel.set()
            return
        await asyncio.sleep(DISCONNECT_POLL)


def build_app(gateway: Gateway) -> FastAPI:
    """A FastAPI app serving ``gateway``; its shutdown stops the generations in flight and closes the model."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(gateway.generator.close)

    app = FastAPI(title="swarm OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_api_route("/v1/models", gateway.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", gateway.get_model, methods=["GET"])
    app.add_api_route("/v1/completions", gateway.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", gateway.chat_completions, methods=["POST"])
    return app
