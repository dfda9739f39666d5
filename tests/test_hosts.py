"""The swarm across emulated hosts (network namespaces, swarm/utils/emulated_hosts.py): a bootstrap node that
relays, public servers, a server and a client behind NAT routers each, and a health monitor on a host of its own.
Checks that a NATed server is served through the relay with tokens equal to the local model's, that killing the
relay makes the client fail over, and that the swarm outlives its bootstrap node: a new client and a new monitor
entering through any one server see the whole swarm. Needs root and iptables; skipped otherwise, saying why."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.local_swarm import LocalSwarm, start_process
from swarm.utils.emulated_hosts import EmulatedNetwork, Host, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
CLIENT = str(Path(__file__).parent / "host_client.py")
PROMPT = [1, 5, 9, 17]


class Client:
    """tests/host_client.py on an emulated host: one model object, a generation per request."""

    def __init__(self, host: Host, model: Path, peers: list[str]):
        # stopped by PID with the network, whatever happens
        self.proc = host.popen([sys.executable, CLIENT, str(model), *peers], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def generate(self, prompt: list[int]) -> list[int]:
        self.proc.stdin.write(json.dumps(prompt) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        assert line.startswith("["), line or "the client process died"
        return json.loads(line)


class Monitor:
    """``python -m swarm.health`` on an emulated host; its JSON state read from inside that host."""

    def __init__(self, host: Host, swarm: LocalSwarm, peers: list[str], history: Path, port: int = 8000,
                 refresh: float = 2):
        self.host, self.url = host, f"http://{host.address}:{port}/api/v1/state"
        start_process(swarm, ["-m", "swarm.health", "--initial-peers", *peers, "--host", host.address, "--port",
                              str(port), "--refresh", str(refresh), "--history", str(history)],
                      "Health page:", f"health-{host.name}-{port}", on=host)

    def state(self, timeout: float = 60) -> dict:
        """The state, once the service answers (its first refresh runs before it does)."""
        code = f"import urllib.request, sys; sys.stdout.write(urllib.request.urlopen({self.url!r}).read().decode())"
        deadline = time.monotonic() + timeout
        while (result := self.host.run([sys.executable, "-c", code], timeout=30)).returncode != 0:
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.5)
        return json.loads(result.stdout)

    def wait_for(self, predicate, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while not predicate(state := self.state()) and time.monotonic() < deadline:
            time.sleep(1)
        return state


@pytest.fixture(scope="module")
def hosts(tiny_model, tmp_path_factory):
    path = tiny_model("llama")
    with EmulatedNetwork() as net, LocalSwarm(tmp_path_factory.mktemp("hosts")) as swarm:
        names = ("boot", "pub1", "pub2", "mon")
        hosts = {name: net.public_host(name) for name in names}
        hosts.update({name: net.home_host(name) for name in ("home1", "home2")})
        boot = swarm.start_dht(on=hosts["boot"])
        servers = {"pub1": swarm.start_server(path, "0:3", [boot.maddr], "--relay", on=hosts["pub1"], wait=False),
                   "home1": swarm.start_server(path, "3:6", [boot.maddr], on=hosts["home1"], wait=False)}
        for server in servers.values():
            server.wait_ready()
        local = AutoModelForCausalLM.from_pretrained(path).eval()
        expected = local.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None)
        yield {"net": net, "swarm": swarm, "hosts": hosts, "boot": boot, "servers": servers, "path": path,
               "expected": expected[0].tolist(), "history": tmp_path_factory.mktemp("health") / "history.sqlite3"}


def servers_by_name(state: dict, servers: dict) -> dict[str, dict]:
    names = {server.peer_id: name for name, server in servers.items()}
    return {names.get(s["peer_id"], s["peer_id"]): s for model in state["models"] for s in model["servers"]}


def test_a_server_behind_nat_serves_through_the_relay(hosts):
    h, servers = hosts["hosts"], hosts["servers"]
    # the NATed client reaches the NATed server only through the relay: blocks 3:6 have no other server yet
    client = Client(h["home2"], hosts["path"], [hosts["boot"].maddr])
    hosts["client"] = client
    assert client.generate(PROMPT) == hosts["expected"]

    hosts["monitor"] = monitor = Monitor(h["mon"], hosts["swarm"], [hosts["boot"].maddr], hosts["history"])
    state = monitor.wait_for(lambda s: s["totals"]["servers_online"] == 2)
    seen = servers_by_name(state, servers)
    assert seen["home1"]["reachability"] == "relay" and "behind relay: slower" in seen["home1"]["warnings"]
    # pub1 relays too, but a NATed server prefers the relay of the peer it entered through
    assert seen["home1"]["relay"].startswith(h["boot"].address + ":")
    assert seen["pub1"]["reachability"] == "direct"
    assert state["models"][0]["can_generate"]


def test_killing_the_relay_fails_over_to_another_route(hosts):
    h, servers, swarm = hosts["hosts"], hosts["servers"], hosts["swarm"]
    servers["pub2"] = swarm.start_server(hosts["path"], "3:6", [servers["pub1"].maddr], on=h["pub2"])
    hosts["boot"].signal(9)  # the bootstrap node and relay goes down with its machine
    # the client's route to home1 went through that relay: it fails over (to pub2, or to home1 through pub1's
    # relay) and the tokens are the same
    assert hosts["client"].generate(PROMPT) == hosts["expected"]
    # the NATed server moved to the relay that is left, and the monitor (which entered through the dead bootstrap
    # node) still sees every server
    state = hosts["monitor"].wait_for(
        lambda s: (servers_by_name(s, servers).get("home1", {}).get("relay") or "").startswith(h["pub1"].address)
        and s["totals"]["servers_online"] == 3)
    seen = servers_by_name(state, servers)
    assert seen["home1"]["relay"].startswith(h["pub1"].address + ":"), seen["home1"]
    assert {name: s["reachability"] for name, s in seen.items()} == {
        "pub1": "direct", "pub2": "direct", "home1": "relay"}


def test_the_swarm_outlives_its_bootstrap_node(hosts):
    """With the bootstrap node gone, any server is an entry point: a new client entering through one public server
    generates, and a new monitor entering through the other sees every server at its first refresh."""
    h, servers = hosts["hosts"], hosts["servers"]
    client = Client(h["home2"], hosts["path"], [servers["pub2"].maddr])
    assert client.generate(PROMPT) == hosts["expected"]

    # a refresh period longer than the test: what it shows is what its first refresh found
    monitor = Monitor(h["mon"], hosts["swarm"], [servers["pub1"].maddr],
                      hosts["history"].with_name("history-2.sqlite3"), port=8001, refresh=600)
    seen = servers_by_name(state := monitor.state(), servers)
    assert {name: s["reachability"] for name, s in seen.items()} == {
        "pub1": "direct", "pub2": "direct", "home1": "relay"}, state
    assert state["models"][0]["can_generate"]


def test_emulated_hosts_are_isolated_and_cleaned_up_after_a_failure():
    """A home host can dial out but not be dialed; the bridge reaches nothing else; an error inside the network
    still stops its processes and deletes its namespaces."""
    listener = "import socket, time; s = socket.create_server(('0.0.0.0', 9000)); time.sleep(600)"

    def dial(host: Host, address: str) -> bool:
        code = f"import socket; socket.create_connection(({address!r}, 9000), timeout=2).close()"
        return host.run([sys.executable, "-c", code], timeout=30).returncode == 0

    with pytest.raises(RuntimeError, match="on purpose"):
        with EmulatedNetwork() as net:
            public, home = net.public_host("pub"), net.home_host("home")
            procs = [public.popen([sys.executable, "-c", listener]), home.popen([sys.executable, "-c", listener])]
            time.sleep(1.0)
            assert dial(home, public.address)  # out through the NAT router
            assert not dial(public, home.address) and not dial(public, net.router_address(home))  # nobody in
            # no route out of the emulated internet: nothing is ever sent beyond its hosts
            assert "default" not in public.run(["ip", "route"]).stdout
            namespaces = list(net.namespaces)
            raise RuntimeError("on purpose")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in namespaces)
    assert all(proc.poll() is not None for proc in procs)
