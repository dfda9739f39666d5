"""A real local EVM node for the settlement tests: anvil from the npm package @foundry-rs/anvil (installed by
`make` / `.ci/run` under .venv/node), started on 127.0.0.1 and ended by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from swarm.local_swarm import free_port

NPM_PACKAGES = Path(__file__).parent.parent / ".venv/node/node_modules/@foundry-rs"


def find_anvil() -> str | None:
    """The binary of the npm package (in its platform's optional dependency, e.g. anvil-linux-amd64), else PATH's."""
    for binary in sorted(NPM_PACKAGES.glob("anvil-*/bin/anvil")):
        if os.access(binary, os.X_OK):
            return str(binary)
    return shutil.which("anvil")


@contextlib.contextmanager
def anvil_node(timeout: float = 20) -> Iterator[str]:
    """Start anvil; yields its RPC URL."""
    from web3 import Web3

    binary = find_anvil()
    if binary is None:
        raise FileNotFoundError("anvil not found: `npm install --prefix .venv/node @foundry-rs/anvil@1.7.1`")
    port = free_port()
    process = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", str(port), "--silent"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not Web3(Web3.HTTPProvider(url)).is_connected():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"anvil did not start (exit code {process.poll()})")
            time.sleep(0.05)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def funded_accounts(w3, names: list[str], wei: int = 10**19) -> dict:
    """Fresh accounts (eth_account LocalAccount), funded from the node's first unlocked account."""
    from eth_account import Account

    accounts = {name: Account.create() for name in names}
    funder = w3.eth.accounts[0]
    for account in accounts.values():
        w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction({"from": funder, "to": account.address,
                                                                     "value": wei}))
    return accounts
