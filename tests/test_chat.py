"""The terminal chat (python -m swarm.chat) driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import time
from pathlib import Path

import pytest
from tiny_models import save_tiny_chat_model

from swarm import AutoDistributedModelForCausalLM, load_tokenizer
from swarm.chat import ANSWER, PROMPT
from swarm.utils import preloaded

MAX_NEW_TOKENS = 12
STATS = re.compile(r"\[(\d+) new prompt tokens sent, (\d+) positions cached on the servers\]")


@pytest.fixture(scope="module")
def swarm(launcher, tmp_path_factory, embedded_model):
    path = save_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat")
    first = launcher.start_server_in_process(path, "0:2", [])
    launcher.start_server_in_process(path, "2:4", [first.maddr])
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[first.maddr], compression="none")
    yield {"path": path, "peers": [first.maddr], "model": model, "tokenizer": load_tokenizer(path)}
    model.shutdown()


class Terminal:
    """A process on a pseudo-terminal: ``expect`` reads its output until a text has appeared enough times."""

    def __init__(self, args: list[str]):
        """``python ARGS`` forked from the pre-imported zygote (swarm/utils/preloaded.py), in a session of its own
        whose controlling terminal is the pty."""
        self.master, self.slave = pty.openpty()
        terminal = Path(os.ttyname(self.slave))
        self.proc = preloaded.popen(args, terminal, stdin=terminal)
        self.output = ""

    def expect(self, text: str, count: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.output.count(text) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{text!r} did not appear {count} times:\n{self.output}")
            ready, _, _ = select.select([self.master], [], [], min(remaining, 1.0))
            if not ready and self.proc.poll() is not None:  # this test holds the terminal open: no EIO at its end
                raise RuntimeError(f"the chat exited early ({self.proc.returncode}):\n{self.output}")
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the process closed the terminal
                    data = b""
                if not data:
                    raise RuntimeError(f"the chat exited early ({self.proc.poll()}):\n{self.output}")
                self.output += data.decode("utf-8", errors="replace")

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_chat_answers_two_turns_over_one_session(swarm):
    terminal = Terminal(["-m", "swarm.chat", str(swarm["path"]), "--initial-peers", *swarm["peers"],
                         "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS), "--compression", "none",
                         "--verbose"])
    turns = ["Hello! Who are you?", "Tell me a story about a cat."]
    try:
        terminal.expect(PROMPT, 1)
        for number, turn in enumerate(turns, start=2):
            terminal.send(turn.encode() + b"\n")
            terminal.expect(PROMPT, number)  # the answer was printed and the next turn is awaited
        terminal.send(b"\x04")  # Ctrl-D on an empty line: end of input
        terminal.proc.wait(60)
    finally:
        terminal.close()
    output = terminal.output
    assert terminal.proc.returncode == 0, output

    # The same two turns through one session of the reference client, greedy.
    model, tokenizer = swarm["model"], swarm["tokenizer"]
    conversation, expected = [], []
    with model.inference_session(max_length=2048):
        for turn in turns:
            conversation.append({"role": "user", "content": turn})
            input_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)["input_ids"]
            out = model.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            expected.append(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))
            conversation.append({"role": "assistant", "content": expected[-1]})

    # Each answer runs from "Assistant: " to the stats line printed after it (the terminal turns \n into \r\n).
    answers = re.findall(r"Assistant: (.*?)\r?\n" + STATS.pattern, output, flags=re.S)
    assert len(answers) == 2, output
    for (answer, _, _), reference in zip(answers, expected, strict=True):
        assert reference.strip()
        assert re.sub(r"\s", "", answer) == re.sub(r"\s", "", reference)
    prompt_lengths = [len(tokenizer.apply_chat_template(conversation[:end], add_generation_prompt=True,
                                                        return_dict=True)["input_ids"]) for end in (1, 3)]
    (first_sent, first_cached), (second_sent, second_cached) = [(int(a), int(b)) for _, a, b in answers]
    assert first_sent == prompt_lengths[0]
    # The session kept the first turn on the servers: the second turn sent at most its new part of the prompt (the
    # answer's tokens are reused too where its text tokenizes back to the same tokens).
    assert second_sent <= prompt_lengths[1] - prompt_lengths[0]
    assert second_cached > first_cached


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(swarm):
    """A terminal's Ctrl-C reaches the chat's whole process group. It stops the answer being generated, and the
    next turn is answered through the same swarm connection (p2pd runs in a process group of its own)."""
    terminal = Terminal(["-m", "swarm.chat", str(swarm["path"]), "--initial-peers", *swarm["peers"],
                         "--temperature", "0", "--max-new-tokens", "400", "--compression", "none", "--verbose"])
    try:
        terminal.expect(PROMPT, 1)
        terminal.send(b"Tell me a very long story.\n")
        terminal.expect("Assistant: ", 1)
        time.sleep(0.5)  # in the middle of the answer
        os.killpg(terminal.proc.pid, signal.SIGINT)
        terminal.expect("(interrupted)", 1)
        terminal.send(b"Hello!\n")
        terminal.expect(PROMPT, 3)  # the second turn's answer came through the swarm
        terminal.send(b"\x04")
        terminal.proc.wait(60)
    finally:
        terminal.close()
    assert terminal.proc.returncode == 0, terminal.output
    assert len(STATS.findall(terminal.output)) == 1, terminal.output  # the second turn completed, not the first
    assert "Error" not in terminal.output, terminal.output


@pytest.fixture(scope="module")
def failover_swarm(launcher, tmp_path_factory, embedded_model):
    """Two servers of all the blocks: one that announces itself far faster (so the chat picks it) and errs after a
    few steps, mid-answer; and a healthy one that takes over while the client logs a warning."""
    path = save_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny-chat-failover")
    faulty = launcher.start_server(path, "0:4", [], "--throughput", "1000",
                                   env={"SWARM_TEST_FAULT": "error-after-steps:3"})
    launcher.start_server(path, "0:4", [faulty.maddr], "--throughput", "0.01")
    return {"path": path, "peers": [faulty.maddr]}


def test_help_and_log_lines_stay_out_of_answers(failover_swarm):
    """/help is answered by the chat itself (not sent to the model), and a warning logged while an answer streams
    (here: the failover from a server that errs mid-answer) is printed after the answer, not inside its line."""
    terminal = Terminal(["-m", "swarm.chat", str(failover_swarm["path"]), "--initial-peers",
                         *failover_swarm["peers"], "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS),
                         "--compression", "none"])
    try:
        terminal.expect(PROMPT, 1)
        terminal.send(b"/help\n")
        terminal.expect(PROMPT, 2)
        terminal.send(b"Hello! Who are you?\n")
        terminal.expect(PROMPT, 3)
        terminal.send(b"\x04")
        terminal.proc.wait(60)
    finally:
        terminal.close()
    output = terminal.output
    assert terminal.proc.returncode == 0, output
    help_text = output.split(PROMPT)[1]  # between the first and the second prompt: /help and what it printed
    assert "/reset" in help_text and "/exit" in help_text and ANSWER not in help_text, output
    assert output.count(ANSWER) == 1, output  # /help was not sent to the model

    answer_start = output.index(ANSWER) + len(ANSWER)
    answer_end = output.index("\n", answer_start)  # the answer's line ends with the answer
    warning = "routing its blocks elsewhere"  # the client's failover warning
    assert warning not in output[answer_start:answer_end] and "swarm.client" not in output[answer_start:answer_end]
    assert warning in output[answer_end:], f"no failover warning was logged:\n{output}"  # else this proves nothing
    assert "Error" not in output, output
