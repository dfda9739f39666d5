"""The OpenAI-compatible gateway (python -m swarm.api) as a real process over a real two-server swarm, driven with
the official openai package and raw HTTP: same text as direct generate, streaming, concurrency, errors,
and a client that leaves mid-stream frees its session on the servers."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import requests
import torch
from tiny_models import save_tiny_chat_model

from swarm import AutoDistributedModelForCausalLM, load_tokenizer
from swarm.api.__main__ import READY
from swarm.local_swarm import free_port, start_process
from swarm.rpc import protocol
from swarm.rpc.client import call

MAX_PROMPT_TOKENS = 64  # the gateway's --max-prompt-tokens in these tests
MAX_TOKENS = 5000  # its --max-tokens: above the tiny model's context of 4096, to reach that check too


@pytest.fixture(scope="module")
def swarm(launcher, tmp_path_factory, embedded_model):
    """Two servers of a tiny chat model, a reference client (bit-exact wire) and the gateway in front of them."""
    import openai  # here, not at the top: only the worker that runs these tests imports it (~0.8 CPU-s)

    path = save_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat")
    first = launcher.start_server_in_process(path, "0:2", [])
    second = launcher.start_server_in_process(path, "2:4", [first.maddr])
    port = free_port()
    gateway = start_process(launcher, ["-m", "swarm.api", str(path), "--initial-peers", first.maddr, "--host",
                                       "127.0.0.1", "--port", str(port), "--compression", "none",
                                       "--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-tokens",
                                       str(MAX_TOKENS)], READY, "api")
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:  # the marker is printed before uvicorn listens: poll until it answers
        try:
            if requests.get(f"{base_url}/models", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if gateway.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not come up:\n{gateway.output()}")
        time.sleep(0.2)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr], compression="none")
    yield {"path": path, "servers": [first, second], "gateway": gateway, "base_url": base_url, "port": port,
           "model": model, "tokenizer": load_tokenizer(path),
           "client": openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)}
    model.shutdown()  # the launcher stops the servers and the gateway (SIGTERM, then SIGKILL to each group)


def reference(swarm, input_ids: list[int], max_tokens: int) -> tuple[str, int]:
    """Direct greedy generate through the swarm: the text and the number of generated tokens."""
    out = swarm["model"].generate(torch.tensor([input_ids]), max_new_tokens=max_tokens, do_sample=False)
    generated = out[0, len(input_ids):]
    return swarm["tokenizer"].decode(generated, skip_special_tokens=True), len(generated)


def chat_ids(swarm, messages: list[dict]) -> list[int]:
    return list(swarm["tokenizer"].apply_chat_template(messages, add_generation_prompt=True,
                                                       return_dict=True)["input_ids"])


def test_models_lists_the_served_model(swarm):
    models = swarm["client"].models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    assert swarm["client"].models.retrieve("tiny-chat").id == "tiny-chat"


def test_completion_equals_direct_generate(swarm):
    client, prompt = swarm["client"], "Once upon a time, in a land far away,"
    expected, generated = reference(swarm, swarm["tokenizer"](prompt)["input_ids"], 24)
    assert expected.strip()
    response = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=24, temperature=0)
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == ("length" if generated == 24 else "stop")
    prompt_tokens = len(swarm["tokenizer"](prompt)["input_ids"])
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (
        prompt_tokens, generated, prompt_tokens + generated)

    chunks = list(client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # streamed in pieces
    assert chunks[-1].usage.completion_tokens == generated


def test_chat_completion_equals_direct_generate(swarm):
    client = swarm["client"]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
    expected, generated = reference(swarm, chat_ids(swarm, messages), 20)
    assert expected.strip()
    response = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == len(chat_ids(swarm, messages))
    assert response.usage.completion_tokens == generated

    stream = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason


def test_stop_strings_cut_the_text(swarm):
    client, prompt = swarm["client"], "The weather today is"
    full, _ = reference(swarm, swarm["tokenizer"](prompt)["input_ids"], 30)
    stop = full[len(full) // 2: len(full) // 2 + 3]  # a string the greedy text reaches halfway
    expected = full[:full.find(stop)]
    response = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert (response.choices[0].text, response.choices[0].finish_reason) == (expected, "stop")
    chunks = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_seeded_sampling_repeats_and_n_gives_several_choices(swarm):
    client = swarm["client"]
    kwargs = dict(model="tiny-chat", prompt="Pick a number:", max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    first = client.completions.create(**kwargs)
    assert client.completions.create(**kwargs).choices[0].text == first.choices[0].text
    several = client.completions.create(**kwargs, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.choices[0].text == first.choices[0].text  # choice i is sampled with seed + i
    assert len({c.text for c in several.choices}) > 1
    assert 0 < several.usage.completion_tokens <= 3 * 12


def test_tiny_temperatures_and_64_bit_seeds(swarm):
    """A temperature too small to divide logits by samples greedily (it overflowed to a 500); seeds differing by a
    multiple of 2**32 (all torch's CPU generator keeps) still draw differently."""
    client = swarm["client"]
    tiny = client.completions.create(model="tiny-chat", prompt="Pick a number:", max_tokens=6, temperature=1e-45)
    greedy = client.completions.create(model="tiny-chat", prompt="Pick a number:", max_tokens=6, temperature=0)
    assert tiny.choices[0].text == greedy.choices[0].text
    kwargs = dict(model="tiny-chat", prompt="Pick a number:", max_tokens=12, temperature=1.0)
    texts = {client.completions.create(**kwargs, seed=seed).choices[0].text for seed in (5, 5 + 2**32, 5 + 2**40)}
    assert len(texts) == 3


def test_concurrent_requests_each_get_their_own_answer(swarm):
    client = swarm["client"]
    prompts = [f"Request number {i} says" for i in range(6)]
    expected = [reference(swarm, swarm["tokenizer"](p)["input_ids"], 16)[0] for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            if i % 2:  # half of them streamed
                chunks = client.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=16,
                                                   temperature=0, stream=True)
                results[i] = "".join(c.choices[0].text for c in chunks)
            else:
                results[i] = client.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=16,
                                                       temperature=0).choices[0].text
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert [results.get(i) for i in range(len(prompts))] == expected


def post_raw(swarm, path: str, body: bytes | str) -> requests.Response:
    return requests.post(f"{swarm['base_url']}{path}", data=body, headers={"Content-Type": "application/json"},
                         timeout=60)


def assert_openai_error(response: requests.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_invalid_requests_get_openai_errors_and_the_gateway_keeps_serving(swarm):
    import openai

    client = swarm["client"]
    error = assert_openai_error(post_raw(swarm, "/completions", b'{"model": "tiny-chat", "prompt": '), 400)
    assert "JSON" in error["message"]
    assert_openai_error(post_raw(swarm, "/chat/completions", "[1, 2]"), 400)
    assert_openai_error(post_raw(swarm, "/completions", json.dumps({"model": "tiny-chat", "prompt": "Hi",
                                                                    "max_tokens": "5"})), 400, "max_tokens")
    error = assert_openai_error(post_raw(swarm, "/chat/completions", json.dumps(
        {"model": "tiny-chat", "messages": [{"role": "robot", "content": "Hi"}]})), 400, "messages[0].role")
    assert "robot" in error["message"]
    assert_openai_error(post_raw(swarm, "/completions", json.dumps({"model": "gpt-4", "prompt": "Hi"})), 404, "model")
    assert_openai_error(requests.get(f"{swarm['base_url']}/nowhere", timeout=10), 404)

    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens") as caught:
        client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=-1)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.completions.create(model="tiny-chat", prompt="Hi", n=0)
    long_prompt = " ".join(["word"] * (2 * MAX_PROMPT_TOKENS))
    with pytest.raises(openai.BadRequestError, match=f"at most {MAX_PROMPT_TOKENS}") as caught:
        client.completions.create(model="tiny-chat", prompt=long_prompt, max_tokens=4)
    assert caught.value.body["code"] == "prompt_too_long"
    with pytest.raises(openai.BadRequestError, match=f"at most {MAX_TOKENS}"):
        client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=MAX_TOKENS + 1)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 4096") as caught:
        client.completions.create(model="tiny-chat", prompt="Hi", max_tokens=4096)
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model="tiny-chat", prompt="Hi", presence_penalty=0.5)
    for unsupported in (dict(tool_choice="auto"), dict(functions=[{"name": "f"}]), dict(parallel_tool_calls=True)):
        with pytest.raises(openai.BadRequestError, match="not supported"):
            client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                           **unsupported)
    image = [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]
    with pytest.raises(openai.BadRequestError, match="only text content parts"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": image}])
    with pytest.raises(openai.BadRequestError, match="needs content"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": None}])

    response = client.completions.create(model="tiny-chat", prompt="Still there?", max_tokens=5, temperature=0)
    assert response.choices[0].text == reference(swarm, swarm["tokenizer"]("Still there?")["input_ids"], 5)[0]
    assert swarm["gateway"].proc.poll() is None
    assert "Traceback" not in swarm["gateway"].output()  # every error was an expected one


def server_info(swarm) -> list[dict]:
    manager = swarm["model"].get_remote().manager
    return [manager.loop.run(call(manager.p2p, s.peer_id, protocol.INFO, {}, timeout=10)) for s in swarm["servers"]]


def wait_until(condition, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_client_leaving_mid_stream_frees_the_session_and_long_requests_do_not_block(swarm):
    assert wait_until(lambda: all(info["sessions"] == 0 for info in server_info(swarm)))  # earlier requests closed
    before = server_info(swarm)
    max_tokens = 2000  # with ignore_eos: 2000 steps on each server unless the generation is stopped
    connection = http.client.HTTPConnection("127.0.0.1", swarm["port"], timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(
        {"model": "tiny-chat", "prompt": "Tell me everything.", "max_tokens": max_tokens, "temperature": 0,
         "stream": True, "ignore_eos": True}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    chunks = 0
    while chunks < 5:
        line = response.fp.readline()
        assert line, "the stream ended early"
        chunks += line.startswith(b"data: {")
    during = server_info(swarm)
    assert all(now["cache_tokens_left"] < then["cache_tokens_left"] for now, then in zip(during, before, strict=True))
    # A long generation does not hold up others: a short request is answered while it runs.
    short = swarm["client"].completions.create(model="tiny-chat", prompt="Meanwhile,", max_tokens=6, temperature=0)
    assert short.choices[0].text == reference(swarm, swarm["tokenizer"]("Meanwhile,")["input_ids"], 6)[0]
    assert response.fp.readline()  # the long stream still goes on
    connection.close()  # the client leaves: its socket closes

    freed = wait_until(lambda: [i["cache_tokens_left"] for i in server_info(swarm)] ==
                       [i["cache_tokens_left"] for i in before])
    assert freed, f"cache not freed: {server_info(swarm)} vs {before}"
    after = server_info(swarm)
    for now, then in zip(after, before, strict=True):
        assert now["sessions"] == 0
        assert now["served"]["steps"] - then["served"]["steps"] < max_tokens  # stopped, not run to the end
    # and the gateway goes on serving
    assert swarm["client"].completions.create(model="tiny-chat", prompt="Hi", max_tokens=3).usage.total_tokens > 0
