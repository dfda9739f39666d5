"""Emulated hosts on one Linux machine: network namespaces joined by a bridge that plays the public internet, and
"home" hosts behind NAT routers (tests and benchmarks of a swarm across hosts).

    with EmulatedNetwork() as net:
        relay = net.public_host("relay")          # an address on the emulated internet
        home = net.home_host("home")              # behind a NAT router: it can dial out, nobody can dial in
        proc = home.popen([sys.executable, "-m", "swarm.server", ...], log)

The bridge lives in a namespace of its own, with no link or route to the machine's real network: nothing sent here
can leave the emulated hosts. Each public host and each home router has one veth into the bridge; a router also
has one into its home host, masquerades the home's traffic (iptables) and drops connections opened from outside.
Links can be capped in bandwidth (``tc`` tbf; netem, for delay, is not in these kernels: delay comes from
``swarm.utils.wan_proxy``). Every process started through a host is stopped by PID and every namespace deleted on
exit, also after an error; namespaces left by a run that was killed (its PID gone) are deleted by the next one.

Needs root, ``ip`` (iproute2) and, for home hosts, ``iptables``: :func:`unavailable` says what is missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PREFIX = "swarmnet"  # every namespace made here is named swarmnet<pid>-<role>
PUBLIC_SUBNET = "10.77.0.0/24"  # the emulated internet; exists only inside these namespaces
_counter = itertools.count(1)  # several networks in one process get distinct names


def _run(*args: str, namespace: str | None = None) -> str:
    command = (["ip", "netns", "exec", namespace] if namespace else []) + list(args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def unavailable(home_hosts: bool = True) -> str | None:
    """Why emulated hosts cannot be made here (None if they can): tests skip with this reason."""
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces)"
    if shutil.which("ip") is None:
        return "emulated hosts need `ip` (iproute2)"
    if home_hosts and shutil.which("iptables") is None:
        return "home hosts behind NAT need iptables (apt-get install iptables)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run("ip", "netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot create network namespaces here: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def delete_stale_namespaces() -> None:
    """Delete namespaces of earlier runs whose process is gone (a run killed before it could clean up)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class Host:
    """One emulated machine: a namespace with one address (``address``) others can reach, or, behind NAT, can not."""

    name: str
    namespace: str
    address: str  # its own address: on the emulated internet, or in its home network behind a router
    public: bool
    network: EmulatedNetwork = field(repr=False)

    def command(self, args: Sequence[str]) -> list[str]:
        """``args`` run inside this host (``ip netns exec`` execs the program: its PID is the program's)."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def run(self, args: Sequence[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        """Run ``args`` in this host to completion (output captured as text)."""
        return subprocess.run(self.command(args), capture_output=True, text=True, timeout=timeout, **kwargs)

    def popen(self, args: Sequence[str], log: IO | None = None, env: dict[str, str] | None = None,
              **popen) -> subprocess.Popen:
        """Start ``args`` in this host (see ``EmulatedNetwork.spawn``)."""
        return self.network.spawn(self.namespace, args, log, env, **popen)

    def delay_inbound(self, port: int, rtt_ms: float, log: IO) -> None:
        """Add ``rtt_ms`` of round trip to every connection others open to ``port`` here: a WAN proxy on this host
        takes them (iptables REDIRECT; the kernels here have no netem) and forwards them to the port. The port's
        listener then sees them come from this host itself."""
        proxy_port = self._wan_proxy(self.namespace, self.address, port, rtt_ms, log)
        # only connections arriving from outside (PREROUTING): the proxy's own, made here, go straight to the port
        _run("iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", str(port), "-j", "REDIRECT",
             "--to-ports", str(proxy_port), namespace=self.namespace)

    def delay_outbound(self, address: str, port: int, rtt_ms: float, log: IO) -> None:
        """A home host's connections to ``address:port`` cross ``rtt_ms`` of round trip at its router (a WAN
        proxy there; what the other end sees them come from is the router's address, as with NAT)."""
        router = self.network.router_of(self)
        proxy_port = self._wan_proxy(router, address, port, rtt_ms, log)
        _run("iptables", "-t", "nat", "-A", "PREROUTING", "-i", "eth1", "-p", "tcp", "-d", address, "--dport",
             str(port), "-j", "REDIRECT", "--to-ports", str(proxy_port), namespace=router)

    def _wan_proxy(self, namespace: str, address: str, port: int, rtt_ms: float, log: IO) -> int:
        proxy_port = port + 10000 if port < 55000 else port - 10000
        command = [sys.executable, "-m", "swarm.utils.wan_proxy", "--listen-host", "0.0.0.0", "--listen-port",
                   str(proxy_port), "--target-host", address, "--target-port", str(port), "--rtt-ms", str(rtt_ms)]
        proc = self.network.spawn(namespace, command, log)
        deadline = time.monotonic() + 60
        while "WAN proxy ready" not in Path(log.name).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the WAN proxy for {address}:{port} in {namespace} did not start")
            time.sleep(0.1)
        return proxy_port

    def cap(self, mbit: float) -> None:
        """Cap this host's uplink and downlink at ``mbit`` Mbit/s each (tbf on both ends of its veth)."""
        rate = f"{mbit}mbit"
        burst = f"{max(int(mbit * 1000 / 8 / 10), 16)}kb"  # ~10 ms at that rate, never below one jumbo burst
        for namespace, device in ((self.namespace if self.public else self.network.router_of(self),
                                   "eth0"), (self.network.bridge_namespace, self.network.bridge_port(self))):
            _run("tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate, "burst", burst,
                 "latency", "400ms", namespace=namespace)


class EmulatedNetwork:
    """A bridge (the "internet") and the hosts attached to it; see the module docstring."""

    def __init__(self, subnet: str = PUBLIC_SUBNET):
        self.subnet = ipaddress.ip_network(subnet)
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.bridge_namespace = f"{self.prefix}-net"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen] = []
        self.hosts: list[Host] = []
        self._ports: dict[str, str] = {}  # host name -> its veth end in the bridge namespace
        self._routers: dict[str, str] = {}  # home host name -> its router's namespace
        self._router_addresses: dict[str, str] = {}  # home host name -> its router's public address
        self._next_public = 2  # .1 is left free (a gateway nobody plays)

    def __enter__(self) -> EmulatedNetwork:
        reason = unavailable(home_hosts=False)
        if reason:
            raise RuntimeError(reason)
        delete_stale_namespaces()
        try:
            self._add_namespace(self.bridge_namespace)
            _run("ip", "link", "add", "br0", "type", "bridge", namespace=self.bridge_namespace)
            _run("ip", "link", "set", "br0", "up", namespace=self.bridge_namespace)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process (SIGTERM, SIGKILL after 10 s in all) and delete every namespace."""
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also whatever it started (p2pd runs in a group of its own,
            proc.wait()  # but exits once its parent's control connection is gone)
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self.namespaces.clear()

    def spawn(self, namespace: str, args: Sequence[str], log: IO | None = None, env: dict[str, str] | None = None,
              **popen) -> subprocess.Popen:
        """Start ``args`` in ``namespace``, in a process group of its own, output to ``log`` (other ``Popen``
        arguments, e.g. pipes, pass through); stopped by PID when the network closes."""
        options = {"stdout": log or subprocess.DEVNULL, "stderr": subprocess.STDOUT, **popen}
        proc = subprocess.Popen(["ip", "netns", "exec", namespace, *args], env={**os.environ, **(env or {})},
                                start_new_session=True, **options)
        self.processes.append(proc)
        return proc

    def public_host(self, name: str) -> Host:
        """A host with an address on the emulated internet: anyone on it can connect to it."""
        namespace = self._add_namespace(f"{self.prefix}-{name}")
        address = self._public_address()
        self._plug(name, namespace, address)
        host = Host(name, namespace, address, True, self)
        self.hosts.append(host)
        return host

    def home_host(self, name: str) -> Host:
        """A host behind a NAT router of its own (a home network): it can connect out; connections opened from the
        internet to it are dropped, and it cannot be told apart from its router's address."""
        index = len(self._routers) + 1
        router = self._add_namespace(f"{self.prefix}-{name}-nat")
        self._router_addresses[name] = self._public_address()
        self._plug(name, router, self._router_addresses[name])
        namespace = self._add_namespace(f"{self.prefix}-{name}")
        home_net = ipaddress.ip_network(f"192.168.{index}.0/24")
        gateway, address = str(home_net[1]), str(home_net[2])
        _run("ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", namespace, namespace=router)
        _run("ip", "addr", "add", f"{gateway}/24", "dev", "eth1", namespace=router)
        _run("ip", "link", "set", "eth1", "up", namespace=router)
        _run("ip", "addr", "add", f"{address}/24", "dev", "eth0", namespace=namespace)
        _run("ip", "link", "set", "eth0", "up", namespace=namespace)
        _run("ip", "route", "add", "default", "via", gateway, namespace=namespace)
        _run("sysctl", "-qw", "net.ipv4.ip_forward=1", namespace=router)
        _run("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE", namespace=router)
        _run("iptables", "-A", "FORWARD", "-i", "eth0", "-o", "eth1", "-m", "conntrack", "--ctstate",
             "ESTABLISHED,RELATED", "-j", "ACCEPT", namespace=router)
        _run("iptables", "-A", "FORWARD", "-i", "eth0", "-o", "eth1", "-j", "DROP", namespace=router)
        self._routers[name] = router
        host = Host(name, namespace, address, False, self)
        self.hosts.append(host)
        return host

    def router_of(self, host: Host) -> str:
        """The namespace of ``host``'s NAT router."""
        return self._routers[host.name]

    def router_address(self, host: Host) -> str:
        """The public address of ``host``'s NAT router (what others see its connections come from)."""
        return self._router_addresses[host.name]

    def bridge_port(self, host: Host) -> str:
        return self._ports[host.name]

    def _add_namespace(self, name: str) -> str:
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "link", "set", "lo", "up", namespace=name)
        return name

    def _public_address(self) -> str:
        address = str(self.subnet[self._next_public])
        self._next_public += 1
        return address

    def _plug(self, name: str, namespace: str, address: str) -> None:
        """A veth from the bridge to ``namespace``'s eth0, with ``address`` on it."""
        port = f"p{len(self._ports)}"
        _run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace,
             namespace=self.bridge_namespace)
        _run("ip", "link", "set", port, "master", "br0", namespace=self.bridge_namespace)
        _run("ip", "link", "set", port, "up", namespace=self.bridge_namespace)
        _run("ip", "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0", namespace=namespace)
        _run("ip", "link", "set", "eth0", "up", namespace=namespace)
        self._ports[name] = port

