"""Fuzzing a real server with at least 10,000 malformed or hostile requests while an honest client generates.

Requests are drawn by hypothesis: raw bytes, frames declaring huge sizes, truncated frames and streams, msgpack
that is not a map, junk structures, and real requests (forward, backward, inference open/step/link, push, info)
with fields replaced by hostile values: wrong shapes and dtypes, sizes that do not match the data, negative and
huge lengths, unknown codecs and fields, other clients' session ids. The server must answer each one it can read
with an error or a correct reply, never fail with an unexpected exception, keep its memory bounded, and keep
serving: a concurrent honest client's greedy tokens equal the local model's, and the victim's session is intact.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import msgpack
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.blocks.span import BlockSpan
from swarm.compression import CODECS, deserialize_tensor, serialize_tensor
from swarm.compression.serialize import pack_fields, tensor_fields
from swarm.dht.node import start_dht, stop_dht
from swarm.rpc import protocol
from swarm.rpc.client import Stream, call
from swarm.rpc.framing import HEADER_BYTES, encode_message, read_message
from swarm.utils.loop_thread import LoopThread

# hypothesis notices other threads (the honest client, hivemind) using `random` while it draws
pytestmark = [pytest.mark.slow(seconds=180),
              pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")]

# a two-block tiny llama: the fuzzing is of requests, sessions and codecs, and a valid request's compute (most of
# the server's time) is per block
HIDDEN, BLOCKS = 64, 2
EXAMPLES, ATTACKS_PER_EXAMPLE = 200, 50  # 10,000 requests
CONCURRENCY = 24
REPLY_TIMEOUT = 20.0  # s; a well-framed request must be answered well within this
HONEST_PAUSE = 0.5  # s between the honest client's generations
FOLLOW_UP_TIMEOUT = 3.0  # s; a step repeating a step id already served is dropped without a reply
OWN = "$own"  # stands for the session id the attacker's own open got back
RSS_GROWTH_LIMIT = 96 * 2**20  # bytes the server may grow by between the warm-up and the end of the fuzzing


# ---- hostile values

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=12),
                    st.binary(max_size=48))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4),
                    max_leaves=10)
edge_ints = st.sampled_from([-2**63, -2**31, -1, 0, 1, 2, 3, 5, 6, 7, 64, 4096, 2**31, 2**62, 2**64 - 1])
hostile_ints = st.one_of(st.integers(-3, 12), edge_ints, junk)
dims = st.one_of(st.integers(0, 9), edge_ints)


@functools.cache
def _sampled(options: tuple) -> st.SearchStrategy:
    return st.sampled_from(options)


def choice(options) -> st.SearchStrategy:
    """``st.sampled_from(options)``, one strategy object per list of options (see span_fields)."""
    return _sampled(tuple(options))


@st.composite
def tensors(draw, shape: tuple[int, ...] = (1, 3, HIDDEN), dtype: torch.dtype = torch.float32) -> object:
    """A real serialized tensor, often with one or more of its fields made hostile."""
    codec = draw(choice(sorted(CODECS)))
    real = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.arange(shape[-1]).expand(shape)
    message = tensor_fields(serialize_tensor(real.contiguous(), codec if dtype.is_floating_point else "none"))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(choice([*message, "extra"]))
        action = draw(choice(["junk", "shape", "truncate", "grow", "dtype", "codec", "delete"]))
        if action == "junk":
            message[key] = draw(junk)
        elif action == "shape":
            message["shape"] = draw(st.lists(dims, max_size=9))
        elif action in ("truncate", "grow") and isinstance(message.get("data"), bytes):
            data = message["data"]
            cut = draw(st.integers(0, max(0, len(data) - 1)))
            message["data"] = data[:cut] if action == "truncate" else data + draw(st.binary(min_size=1, max_size=64))
        elif action == "dtype":
            message["dtype"] = draw(choice(["float32", "float16", "bfloat16", "float64", "int64", "int8",
                                                     "uint8", "bool", "complex64", "float8"]))
        elif action == "codec":
            message["codec"] = draw(choice([*CODECS, "hivemind8", "", "none "]))
        else:
            message.pop(key, None)
    form = draw(choice(["array", "array", "array", "map", "array edited"]))
    if form == "map":  # the form of earlier versions
        return message
    packed = pack_fields(message)
    if form == "array edited":  # entries added or cut
        packed = packed[:draw(st.integers(0, len(packed)))] + draw(st.lists(junk, max_size=2))
    return packed


def mutate(draw, message: dict, fields: dict) -> dict:
    """``message`` with 0-3 fields deleted or replaced by values drawn from ``fields`` (or by junk)."""
    for _ in range(draw(st.integers(0, 3))):
        key = draw(choice([*fields, "unknown_field"]))
        if draw(st.integers(0, 5)) == 0:
            message.pop(key, None)
        else:
            message[key] = draw(fields.get(key, junk))
    return message


@functools.cache
def span_fields(batch: int, tokens: int, victim: str) -> dict:
    """The hostile values of a span request's fields, made once per shape: hypothesis spends more time preparing a
    new strategy object for its first draw than drawing from one it knows. With the strategies below also made
    once, drawing the 10,000 attacks takes 11.8 CPU-s instead of 15.9, for the same requests."""
    return {"start": hostile_ints, "end": hostile_ints, "hidden": tensors((batch, tokens, HIDDEN)) | junk,
            "position_ids": tensors((batch, tokens), torch.int64) | tensors((tokens,), torch.int64) | junk,
            "attention_mask": tensors((batch, tokens), torch.int64) | junk,
            "grad_output": tensors((batch, tokens, HIDDEN)) | junk,
            "output_codec": st.sampled_from([*CODECS, "zip", ""]) | junk, "type": st.just("step") | junk,
            "session_id": st.sampled_from([OWN, victim, victim[:-1] + "0", ""]) | junk,
            "position": hostile_ints, "hypo_ids": tensors((batch,), torch.int64) | junk,
            "step_id": hostile_ints, "push": st.booleans() | junk}


@st.composite
def span_requests(draw, victim: str) -> dict:
    """A forward/backward/step-shaped request, usually broken somewhere."""
    batch, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    message = {"start": 0, "end": BLOCKS, "hidden": serialize_tensor(torch.randn(batch, tokens, HIDDEN)),
               "position_ids": serialize_tensor(torch.arange(tokens).expand(batch, tokens).contiguous())}
    return mutate(draw, message, span_fields(batch, tokens, victim))


# made once, like span_fields
OPEN_FIELDS = {"max_length": hostile_ints, "batch_size": hostile_ints, "start": hostile_ints, "end": hostile_ints,
               "upstream": st.text(max_size=60) | junk, "output_codec": st.sampled_from([*CODECS, "zip"]) | junk}
LINK_FIELDS = {"downstream": junk | st.none(), "session_id": junk, "upstream": junk}
PUSH_FIELDS = {"session_id": junk, "step": junk}
OTHER_TYPE, OTHER_FIELDS = st.text(max_size=8) | junk, st.dictionaries(st.text(max_size=8), junk, max_size=3)
JUNK_MAP = st.dictionaries(st.text(max_size=8), junk, max_size=6)
NOT_A_MAP = junk.filter(lambda v: not isinstance(v, dict))


@st.composite
def inference_messages(draw, victim: str, victim_server: str) -> list[dict]:
    """An open message (maybe hostile), then hostile steps, links and closes."""
    opening = {"type": "open", "start": 0, "end": BLOCKS, "max_length": draw(st.integers(1, 64)), "batch_size": 1}
    messages = [mutate(draw, opening, OPEN_FIELDS)]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(choice(["step", "step", "link", "close", "other"]))
        if kind == "step":
            step = draw(span_requests(victim))
            step.setdefault("type", "step")
            step.setdefault("session_id", OWN)  # mostly its own session, so that hostile steps reach the cache
            messages.append(step)
        elif kind == "link":
            downstream = {"peer": victim_server, "session_id": victim, "start": 0, "end": BLOCKS}
            link = {"type": "link", "session_id": draw(choice([OWN, victim])), "downstream": downstream,
                    "upstream": victim_server}
            messages.append(mutate(draw, link, LINK_FIELDS))
        elif kind == "close":
            messages.append({"type": "close"})
        else:
            messages.append({"type": draw(OTHER_TYPE), **draw(OTHER_FIELDS)})
    return messages


@st.composite
def attacks(draw, victim: str, victim_server: str) -> tuple[str, list[bytes] | list[dict], bool]:
    """(protocol, bytes to send as frames, whether the request is well framed and complete, so it must be answered)."""
    rpc = draw(choice([protocol.FORWARD, protocol.BACKWARD, protocol.INFERENCE, protocol.PUSH,
                                protocol.INFO]))
    shape = draw(choice(["message"] * 12 + ["junk", "not_a_map", "int_keys", "random_bytes", "huge_header",
                                                      "truncated_header", "truncated_payload"]))
    if shape == "random_bytes":
        return rpc, [draw(st.binary(min_size=1, max_size=512))], False
    if shape == "huge_header":  # the size alone must get it refused, before any allocation
        size = draw(choice([2**31, 2**40, 2**64 - 1, 300 * 2**20]))
        return rpc, [size.to_bytes(HEADER_BYTES, "big") + draw(st.binary(max_size=64))], True
    if shape == "truncated_header":
        return rpc, [draw(st.binary(min_size=1, max_size=HEADER_BYTES - 1))], False
    if shape in ("junk", "not_a_map", "int_keys"):
        value = {"junk": lambda: draw(JUNK_MAP), "not_a_map": lambda: draw(NOT_A_MAP),
                 "int_keys": lambda: {draw(st.integers(-2**63, 2**64 - 1)): draw(junk)}}[shape]()
        payload = msgpack.packb(value, use_bin_type=True)
        return rpc, [len(payload).to_bytes(HEADER_BYTES, "big") + payload], True
    if rpc == protocol.INFERENCE and shape == "message":  # sent one by one, replies read (see send_attack)
        return rpc, draw(inference_messages(victim, victim_server)), True
    if rpc == protocol.INFERENCE:
        frames = [encode_message(m) for m in draw(inference_messages(victim, victim_server))]
    elif rpc == protocol.PUSH:
        step = draw(span_requests(victim))
        step.setdefault("type", "step")
        frames = [encode_message(mutate(draw, {"session_id": victim, "step": step}, PUSH_FIELDS))]
    else:
        frames = [encode_message(draw(span_requests(victim)))]
    if shape == "truncated_payload":
        frame = frames[0]
        return rpc, [frame[:draw(st.integers(HEADER_BYTES, len(frame) - 1))]], False
    return rpc, frames, True


# ---- the swarm


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama2")


@pytest.fixture(scope="module")
def server(launcher, model_path):
    # Rates high enough for 10,000 requests in a minute or two (test_limits covers pacing); each of the fuzzer's
    # two identities may hold a quarter of the cache, so the honest client always finds room.
    return launcher.start_server(model_path, f"0:{BLOCKS}", [], "--max-message-mb", "4", "--cache-tokens", "2048",
                                 "--peer-rate", "100000", "--peer-burst", "100000", "--max-peer-cache-share", "0.25",
                                 "--max-session-length", "512")


@pytest.fixture(scope="module")
def nodes(server):
    """Two bare clients on one event loop: the attacker, and a victim holding a session the attacker goes after."""
    loop = LoopThread()
    made = [loop.run(start_dht([server.maddr], host="127.0.0.1", client_mode=True)) for _ in range(2)]
    yield loop, [p2p for p2p, _ in made]
    for p2p, node in made:
        loop.run(stop_dht(p2p, node))
    loop.stop()


async def send_attack(p2p, peer: str, rpc: str, frames: list[bytes] | list[dict], answerable: bool) -> list[str]:
    """Send ``frames`` on a fresh stream; the outcomes: "reply", "error: ...", "closed", "timeout" or "sent".

    Frames given as maps are an inference conversation: the open is answered first, then each message is sent
    with the session id that came back in place of ``OWN``, and its reply read (a close has none)."""
    stream = await Stream.open(p2p, peer, rpc, timeout=REPLY_TIMEOUT)

    async def receive(timeout: float) -> str:
        try:
            reply = await asyncio.wait_for(read_message(stream.reader, 2**28), timeout)
        except TimeoutError:
            return "timeout"
        except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError):
            return "closed"
        if reply is None:
            return "closed"
        if "error" in reply:
            return f"error: {reply['error']}"
        return f"reply {reply.get('session_id', '')}"

    try:
        if frames and isinstance(frames[0], dict):
            outcomes = [await _send_and_receive(stream, frames[0], receive, REPLY_TIMEOUT)]
            if not outcomes[0].startswith("reply "):
                return outcomes  # the open was refused and the stream closed
            own = outcomes[0][len("reply "):]
            for message in frames[1:]:
                message = {key: own if value == OWN else value for key, value in message.items()}
                try:
                    if message.get("type") == "close":
                        stream.writer.write(encode_message(message))
                        break
                    outcomes.append(await _send_and_receive(stream, message, receive, FOLLOW_UP_TIMEOUT))
                except (ConnectionError, OSError):
                    outcomes.append("closed")
                if outcomes[-1] == "closed":
                    break
            return outcomes
        for frame in frames:
            stream.writer.write(frame)
            await stream.writer.drain()
        if not answerable:
            return ["sent"]  # a truncated request: the stream is closed under it, which the server must survive
        return [await receive(REPLY_TIMEOUT)]
    except (ConnectionError, OSError):
        return ["closed"]  # the server refused from the header and closed while we were still writing
    finally:
        stream.close()


async def _send_and_receive(stream: Stream, message: dict, receive, timeout: float) -> str:
    stream.writer.write(encode_message(message))
    await stream.writer.drain()
    return await receive(timeout)


def server_memory(process) -> int:
    """RSS of the server and its libp2p daemon."""
    proc = psutil.Process(process.proc.pid)
    return proc.memory_info().rss + sum(child.memory_info().rss for child in proc.children(recursive=True))


def test_fuzzed_server_keeps_serving(server, nodes, model_path):
    loop, (attacker, victim_client) = nodes
    peer = server.peer_id
    span = BlockSpan.from_pretrained(str(model_path), 0, BLOCKS)
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()

    # the victim's session, which the attacker steps, links and pushes into by its id
    victim = loop.run(Stream.open(victim_client, peer, protocol.INFERENCE, timeout=10))
    opened = loop.run(victim.request({"type": "open", "start": 0, "end": BLOCKS, "max_length": 32, "batch_size": 1},
                                     timeout=30))
    victim_id = opened["session_id"]
    sequence = torch.randn(1, 6, HIDDEN)
    positions = torch.arange(6)[None]

    def victim_step(lo: int, hi: int) -> torch.Tensor:
        reply = loop.run(victim.request({"type": "step", "session_id": victim_id, "start": 0, "end": BLOCKS,
                                         "position": lo, "hidden": serialize_tensor(sequence[:, lo:hi]),
                                         "position_ids": serialize_tensor(positions[:, lo:hi].contiguous())},
                                        timeout=30))
        return deserialize_tensor(reply["hidden"])

    first_half = victim_step(0, 3)

    # the honest client generates, again and again, for as long as the fuzzing lasts; with a pause between
    # generations, so that it checks the server all along without taking the CPU the fuzzing needs (back to back,
    # its ~250 generations doubled the test's time on two cores)
    model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=[server.maddr],
                                                            compression="none")
    ids = torch.randint(3, local.config.vocab_size, (1, 6))
    expected = local.generate(ids, max_new_tokens=12, do_sample=False)
    fuzzing, generations, failures = threading.Event(), [], []

    def honest() -> None:
        try:
            while fuzzing.is_set() or not generations:
                out = model.generate(ids, max_new_tokens=12, do_sample=False)
                generations.append(torch.equal(out, expected))
                time.sleep(HONEST_PAUSE)
        except Exception as e:  # reported by the main thread
            failures.append(e)

    outcomes: dict[str, int] = {}  # per message answered (a session carries several)
    requests = [0]  # streams opened, each a hostile request
    memory: list[int] = []
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(attacks(victim_id, peer), min_size=ATTACKS_PER_EXAMPLE, max_size=ATTACKS_PER_EXAMPLE))
    def fuzz(batch: list[tuple[str, list, bool]]) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(attack: tuple[str, list, bool]) -> list[str]:
            async with limit:
                return await send_attack(attacker, peer, *attack)

        async def all_of_them() -> list[list[str]]:
            return await asyncio.gather(*(one(attack) for attack in batch))

        results = loop.run(all_of_them())
        for (rpc, frames, answerable), replies in zip(batch, results, strict=True):
            for number, outcome in enumerate(replies):
                key = "reply" if outcome.startswith("reply") else outcome.split(":")[0]
                outcomes[key] = outcomes.get(key, 0) + 1
                assert "internal error" not in outcome, (rpc, frames[:2], outcome)
                if number == 0 and answerable:  # a follow-up step may be dropped as a duplicate, the first never
                    assert outcome not in ("timeout", "closed"), (f"{outcome}: no answer to a complete {rpc} "
                                                                  f"request", frames[:2])
            requests[0] += 1
        if not memory:
            memory.append(server_memory(server))  # after a warm-up batch: imports, codecs and buffers settled

    fuzzing.set()
    worker = threading.Thread(target=honest)
    worker.start()
    try:
        fuzz()
    finally:
        fuzzing.clear()
        worker.join(timeout=300)
    elapsed = time.monotonic() - started
    memory.append(server_memory(server))
    total = requests[0]
    print(f"\n{total} hostile requests in {elapsed:.0f} s: {outcomes}; server memory {memory[0] / 2**20:.0f} -> "
          f"{memory[-1] / 2**20:.0f} MiB; honest generations: {len(generations)}")

    assert total >= EXAMPLES * ATTACKS_PER_EXAMPLE
    assert set(outcomes) <= {"reply", "error", "sent", "closed", "timeout"}, outcomes
    assert outcomes["error"] > sum(outcomes.values()) // 3  # refused, each with a reason (the rest: valid or info)
    assert server.proc.poll() is None, "the server died"
    info = loop.run(call(victim_client, peer, protocol.INFO, {}, timeout=30))
    assert info["served"]["failures"] == 0, "an unexpected exception in the server (see its log)"
    assert memory[-1] - memory[0] < RSS_GROWTH_LIMIT, memory
    assert not failures, failures
    assert generations and all(generations), generations  # every honest generation equalled the local model
    # the victim's session was neither closed nor altered by the attacker's steps, links and pushes
    full = span(sequence, positions)
    assert torch.allclose(first_half, full[:, :3], rtol=1e-4, atol=1e-4)
    assert torch.allclose(victim_step(3, 6), full[:, 3:], rtol=1e-4, atol=1e-4)
    victim.close()
