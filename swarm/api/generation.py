"""Running ``generate`` for the gateway: one worker thread per generation, text streamed back as it is decoded.

Inference sessions are per thread, so each generation runs in a thread of a pool sized for the concurrency the
gateway allows: several requests are served at once, each through its own session, and a slow or failing one holds
only its own thread. The event loop receives text deltas through a queue; a cancellation flag (set when the client
goes away) ends a generation after its current step, which closes its session and frees the servers' caches.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from swarm.client.model import DistributedModelForCausalLM

logger = logging.getLogger(__name__)

# What decode() shows for a character whose UTF-8 bytes are split over several tokens not all generated yet.
INCOMPLETE = "\ufffd"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int  # generation ends after this many tokens at the latest
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling: sample from the smallest set of tokens whose probabilities reach top_p
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings, which is not returned
    ignore_eos: bool = False  # go on past end-of-sequence tokens (vLLM's extension: benchmarks, tests)


@dataclass(frozen=True)
class Job:
    """One generation: a prompt's token ids and how to continue it."""

    input_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Completion:
    text: str  # decoded without special tokens, cut before a stop string
    prompt_tokens: int
    completion_tokens: int  # generated tokens, an end-of-sequence token included
    finish_reason: str  # "stop" (end of sequence or a stop string), "length" (max_new_tokens) or "cancelled"


@dataclass(frozen=True)
class TextDelta:
    job: int  # index in the jobs passed to Generator.run
    text: str  # may be empty: one delta per generated token, the first one marks the end of the prefill


@dataclass(frozen=True)
class Finished:
    job: int
    completion: Completion


@dataclass(frozen=True)
class _Failed:
    job: int
    error: BaseException


class ShuttingDown(RuntimeError):
    """A generation stopped because the gateway stops."""


class Generator:
    """``async for event in generator.run(jobs, cancel)``: runs each job in a worker thread of its own."""

    def __init__(self, model: DistributedModelForCausalLM, tokenizer: PreTrainedTokenizerBase, max_concurrency: int):
        self.model, self.tokenizer = model, tokenizer
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="generate")
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._running: set[threading.Event] = set()  # cancellation flags of requests in flight, for shutdown
        self.closing = False  # set when the gateway stops: cancelled generations then fail with ShuttingDown
        self.closed = False

    async def run(self, jobs: Sequence[Job], cancel: threading.Event) -> AsyncIterator[TextDelta | Finished]:
        """Run all ``jobs`` at once; yields their text as it is generated and a ``Finished`` for each one.

        If a job fails its error is raised here. If the consumer stops early (the client went away) or a job fails,
        ``cancel`` is set: the other jobs end after their current step and close their sessions.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TextDelta | Finished | _Failed] = asyncio.Queue()

        def emit(event: TextDelta | Finished | _Failed) -> None:  # called from worker threads
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                cancel.set()

        if self.closing:
            raise ShuttingDown("the gateway is shutting down")
        self._running.add(cancel)
        for index, job in enumerate(jobs):
            self.pool.submit(self._work, index, job, cancel, emit)
        remaining = len(jobs)
        try:
            while remaining:
                event = await queue.get()
                if isinstance(event, _Failed):
                    raise event.error
                if isinstance(event, Finished):
                    remaining -= 1
                yield event
        finally:
            if remaining:
                cancel.set()
            self._running.discard(cancel)

    def cancel_all(self) -> None:
        """Stop every generation in flight after its current step (each closes its session)."""
        self.closing = True
        for cancel in list(self._running):
            cancel.set()

    def close(self) -> None:
        """Stop the generations in flight, the worker threads, and the model's connection to the swarm (the
        generator owns the model). Safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        self.cancel_all()
        self.pool.shutdown(wait=True)  # queued jobs still start, see their flag and end at once
        self.model.shutdown()

    def _work(self, index: int, job: Job, cancel: threading.Event, emit: Callable) -> None:
        try:
            if cancel.is_set():  # the client left while this job waited for a free worker
                emit(Finished(index, Completion("", len(job.input_ids), 0, "cancelled")))
                return
            completion = self.generate(job, cancel, lambda text: emit(TextDelta(index, text)))
            if completion.finish_reason == "cancelled" and self.closing:
                raise ShuttingDown("the gateway is shutting down")
            emit(Finished(index, completion))
        except BaseException as e:  # handed to the request's coroutine, which answers with an error
            emit(_Failed(index, e))

    def generate(self, job: Job, cancel: threading.Event, on_text: Callable[[str], None]) -> Completion:
        """One generation in the calling thread (through its own inference session, opened by ``generate``)."""
        params, started = job.params, time.perf_counter()
        prompt = torch.tensor([job.input_ids], dtype=torch.long)
        tracker = TextTracker(self.tokenizer, prompt.shape[1], params.stop, cancel, on_text)
        kwargs: dict = dict(max_new_tokens=params.max_new_tokens, do_sample=False,
                            stopping_criteria=StoppingCriteriaList([tracker]),
                            attention_mask=torch.ones_like(prompt))
        if params.temperature >= MIN_TEMPERATURE:
            kwargs["logits_processor"] = LogitsProcessorList(
                [SeededSampler(params.temperature, params.top_p, params.seed)])
        if params.ignore_eos:
            kwargs["eos_token_id"] = None
        output = self.model.generate(prompt, **kwargs)
        generated = output[0, prompt.shape[1]:].tolist()
        text = tracker.finish(generated)
        if cancel.is_set() and not tracker.stopped:
            reason = "cancelled"
            logger.info(f"Generation cancelled after {len(generated)} of {params.max_new_tokens} tokens "
                        f"({time.perf_counter() - started:.1f} s); its session is closed")
        elif tracker.stopped or (generated and generated[-1] in self.eos_ids and not params.ignore_eos):
            reason = "stop"
        else:
            reason = "length"
        return Completion(text, len(job.input_ids), len(generated), reason)


class TextTracker(StoppingCriteria):
    """Decodes the text after each new token, sends what is final, and ends generation on a stop string or when
    ``cancel`` is set.

    transformers calls stopping criteria right after appending each token and before handing it to a streamer, so
    this is the one place that sees a stop string in the same step it is completed (a streamer would learn of it
    only after the next step was decided).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, stop: Sequence[str],
                 cancel: threading.Event, on_text: Callable[[str], None]):
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, tuple(stop)
        self.cancel, self.on_text = cancel, on_text
        self.sent = ""  # text handed to on_text so far
        self.stopped = False  # a stop string was generated

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        text = self.text(input_ids[0, self.prompt_length:].tolist())
        # Hold back what may still change: a character whose bytes are not all here, the start of a stop string.
        self._send(text if self.stopped else text[:sendable_length(text, self.stop)])
        done = self.stopped or self.cancel.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def text(self, generated: list[int]) -> str:
        """The generated text, cut before the first stop string (and then ``stopped`` is set)."""
        # The whole continuation is decoded each step (microseconds for thousands of tokens with a fast tokenizer):
        # decoding tokens one by one mangles characters split over tokens and the spaces of SentencePiece tokens.
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        cuts = [index for stop in self.stop if (index := text.find(stop)) >= 0]
        if cuts:
            self.stopped = True
            return text[:min(cuts)]
        return text

    def finish(self, generated: list[int]) -> str:
        """The final text; sends whatever was held back."""
        text = self.text(generated)
        if not text.startswith(self.sent):  # a tokenizer whose text of a prefix is not a prefix of the text
            logger.warning("Streamed text differs from the final decoded text; the stream ends with the remainder")
        self._send(text, force=True)
        return text

    def _send(self, text: str, force: bool = False) -> None:
        # Text inconsistent with what was sent waits for more tokens, unless it is the final text.
        delta = text[len(self.sent):] if force or text.startswith(self.sent) else ""
        self.sent += delta
        self.on_text(delta)  # even when empty: the first call tells the request that its prefill is done


def sendable_length(text: str, stop: Sequence[str]) -> int:
    """How much of ``text`` can be sent now: not a trailing incomplete character, not the trailing start of a
    stop string (which the next tokens may complete)."""
    end = len(text.rstrip(INCOMPLETE))
    hold = 0
    for string in stop:
        for length in range(min(len(string) - 1, end), hold, -1):
            if text.endswith(string[:length], 0, end):
                hold = length
                break
    return end - hold


# Below this temperature sampling picks the most likely token anyway, and dividing float32 logits by it overflows
# to inf (1e-45 gave NaN probabilities): such requests run greedy.
MIN_TEMPERATURE = 1e-4


def generator_seed(seed: int) -> int:
    """A request's 64-bit seed as the 32 bits torch's CPU generator keeps (mt19937 uses only the low 32 bits, so
    seeds differing by a multiple of 2**32 drew the same tokens): hashed, so every bit of the seed counts."""
    digest = hashlib.blake2b(seed.to_bytes(9, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class SeededSampler(LogitsProcessor):
    """Temperature and nucleus (top-p) sampling with the request's own random generator.

    torch's global generator is shared by every thread, so seeding it per request (``torch.manual_seed``) would mix
    concurrent requests' draws. This processor draws the token itself and leaves only that one possible; generate
    runs greedy (``do_sample=False``) and picks it.
    """

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(generator_seed(seed))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            # A token stays if the tokens more likely than it do not reach top_p yet: the first one always stays.
            outside = probs.cumsum(-1) - probs >= self.top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(outside, -torch.inf))
        token = torch.multinomial(scores.softmax(-1), 1, generator=self.generator)
        return torch.full_like(scores, -torch.inf).scatter_(-1, token, 0.0)
