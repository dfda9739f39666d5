"""The health service over a real swarm, read in a real browser (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarm.health.state import STATE_SCHEMA
from swarm.local_swarm import free_port
from swarm.utils import preloaded

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]
# Screenshots for a human to look at: outside the project's tree (tests write nothing there), kept after the run.
ARTIFACTS = Path(os.environ.get("SWARM_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "swarm-test-artifacts")


class HealthService:
    def __init__(self, peers: list[str], history: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = history.with_suffix(".log")
        self.proc = preloaded.popen(  # forked from the pre-imported zygote, in a session of its own
            ["-m", "swarm.health", "--initial-peers", *peers, "--host", "127.0.0.1", "--port", str(self.port),
             "--refresh", "1", "--history", str(history)], self.log)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the health service did not start:\n{self.log.read_text()}") from None
                time.sleep(0.2)

    def get(self, path: str) -> str:
        return urllib.request.urlopen(self.url + path, timeout=10).read().decode()

    def state(self) -> dict:
        return json.loads(self.get("/api/v1/state"))

    def wait_for_state(self, predicate, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while not predicate(state := self.state()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return state

    def stop(self) -> None:
        if self.proc.poll() is not None:  # ended (and reaped by the zygote): its PID may be another's by now
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium) for this test")
    from playwright.sync_api import sync_playwright

    # chromium keeps a profile and dconf a cache under the home directory: give it one of its own, not the user's
    home = tmp_path_factory.mktemp("browser-home")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache")}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, env=env)
        yield browser
        browser.close()


def metrics(service: HealthService) -> dict[tuple[str, str], float]:
    values = {}
    for family in text_string_to_metric_families(service.get("/metrics")):
        for sample in family.samples:
            values[(sample.name, sample.labels.get("model", sample.labels.get("quantile", "")))] = sample.value
    return values


def load(page, url: str) -> None:
    """``page.goto``, again if the page's own periodic reload aborted that navigation (a race, not a fault)."""
    from playwright.sync_api import Error as PlaywrightError

    for attempt in range(3):
        try:
            page.goto(url)
            return
        except PlaywrightError as e:
            if "ERR_ABORTED" not in str(e) or attempt == 2:
                raise


@pytest.mark.slow
def test_health_page_shows_coverage_and_a_lost_server(launcher, tiny_model, browser, tmp_path):
    path = tiny_model("llama")
    first = launcher.start_server_in_process(path, "0:2", [], "--public-name", "first <server>")
    others = [launcher.start_server(path, blocks, [first.maddr], wait=False) for blocks in ("2:4", "4:6")]
    # a black hole: announces itself very fast, answers info, never computes
    hole = launcher.start_server(path, "4:6", [first.maddr], "--throughput", "1000000", wait=False,
                                 env={"SWARM_TEST_FAULT": "black-hole"})
    for server in [*others, hole]:
        server.wait_ready()
    history = tmp_path / "history.sqlite3"
    service = HealthService([first.maddr], history)
    page = browser.new_page(viewport={"width": 1400, "height": 600})
    try:
        state = service.wait_for_state(lambda s: s["totals"]["servers_online"] == 4)
        jsonschema.validate(state, STATE_SCHEMA)
        assert state["models"][0]["model_id"] == "tiny-llama" and state["models"][0]["healthy"]
        # claims checked against a one-position forward: the black hole is shown for what it is
        claims = {server["peer_id"]: server for server in state["models"][0]["servers"]}
        assert claims.pop(hole.peer_id)["claim"] == "no answer"
        assert all(server["measured_rps"] > 0 and server["claim"] != "no answer" for server in claims.values())

        load(page, service.url + "/")
        model = page.locator("section.model[data-model='tiny-llama']")
        assert model.get_attribute("data-healthy") == "true"
        blocks = model.locator(".coverage .block")
        assert blocks.count() == 6
        # the black hole answers info but serves nothing: it does not count as covering its blocks
        assert [blocks.nth(i).get_attribute("data-servers") for i in range(6)] == ["1"] * 6
        rows = model.locator("table.servers tbody tr.server")
        assert rows.count() == 4
        spans = sorted(rows.nth(i).locator("td.blocks .span-text").inner_text() for i in range(4))
        assert spans == ["0:2", "2:4", "4:6", "4:6"]
        assert model.get_attribute("data-can-generate") == "true"
        assert model.locator("#verdict").inner_text() == "can generate now"
        hole_row = model.locator(f"tr.server[data-peer='{hole.peer_id}']")
        assert "no answer" in hole_row.locator("td.speed").inner_text()
        assert "never answers" in hole_row.locator("td.warnings").inner_text()
        assert {rows.nth(i).locator("td.reachability").inner_text() for i in range(4)} == {"direct"}
        # each server's bar covers its share of the model: 2 of 6 blocks
        assert model.locator(".spanbar span").first.get_attribute("style") == "left:0.0%;width:33.3%"
        assert "first <server>" in model.inner_text()  # shown as text, escaped, not as markup
        assert "1 model (1 healthy)" in page.locator("#totals").inner_text()
        assert "2+ servers" in page.locator("#legend").inner_text()
        headers = model.locator("thead").inner_text()
        assert "throughput (tokens/s)" in headers and "free cache (tokens)" in headers and "RTT (ms)" in headers
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "health-page.png"), full_page=True)

        lost = others[0]
        lost.signal(signal.SIGKILL)  # its DHT record says online until it expires; the probe finds it silent
        state = service.wait_for_state(lambda s: s["models"][0]["missing_blocks"] == 2)
        jsonschema.validate(state, STATE_SCHEMA)
        assert state["models"][0]["coverage"] == [1, 1, 0, 0, 1, 1] and not state["models"][0]["healthy"]

        load(page, service.url + "/")  # the page also reloads itself every refresh period
        assert model.get_attribute("data-healthy") == "false"
        assert model.get_attribute("data-can-generate") == "false"
        assert "blocks 2-3" in model.locator("h2").inner_text()
        assert [blocks.nth(i).get_attribute("class") for i in (2, 3)] == ["block missing"] * 2
        row = model.locator(f"tr.server[data-peer='{lost.peer_id}']")
        assert row.get_attribute("class") == "server unreachable"
        assert row.locator("td.reachability").inner_text() == "unreachable"
        assert row.locator("td.warnings").inner_text() == "not answering"
        assert row.locator("td.state").inner_text() == "offline (not answering)"  # its record still says online
        page.screenshot(path=str(ARTIFACTS / "health-page-broken.png"), full_page=True)

        values = metrics(service)
        assert values[("swarm_blocks_zero_coverage", "tiny-llama")] == 2
        assert values[("swarm_model_healthy", "tiny-llama")] == 0
        assert values[("swarm_servers_online", "tiny-llama")] == 3
        assert values[("swarm_servers_unreachable", "tiny-llama")] == 1
        assert values[("swarm_server_rtt_seconds", "0.5")] > 0
    finally:
        page.close()
        service.stop()

    # The history is in SQLite: a restarted service shows the chart at once.
    restarted = HealthService([first.maddr], history)
    try:
        page = browser.new_page()
        load(page, restarted.url + "/")
        assert page.locator("svg.chart polyline").count() == 2
        # 0, the top value, and between one and six times of day at round steps
        assert 3 <= page.locator("svg.chart text.axis").count() <= 8
        page.close()
    finally:
        restarted.stop()


def test_healthz_and_schema_endpoints(launcher, tiny_model, tmp_path):
    first = launcher.start_server_in_process(tiny_model("llama"), "0:6", [])
    service = HealthService([first.maddr], tmp_path / "history.sqlite3")
    try:
        assert json.loads(service.get("/healthz"))["ok"] is True
        assert json.loads(service.get("/api/v1/schema")) == json.loads(json.dumps(STATE_SCHEMA))
        for path in ("/docs", "/redoc"):  # FastAPI's pages would load scripts from a CDN: not offered
            with pytest.raises(urllib.error.HTTPError, match="404"):
                service.get(path)
        jsonschema.validate(service.state(), STATE_SCHEMA)
    finally:
        service.stop()


def test_warnings_verdict_contributors_and_chart_from_records():
    """The page's judgments from records alone: reachability, warnings, "can generate now", settlement totals, and a
    chart over hours with round time labels and a gap where the monitor was stopped."""
    import re

    from swarm.dht.schema import ModelInfo, ServerInfo, ServerState
    from swarm.health.page import render_page
    from swarm.health.state import SwarmState, model_status

    def record(start: int, end: int, **kwargs) -> ServerInfo:
        return ServerInfo(**{"state": ServerState.ONLINE, "start": start, "end": end, "version": "0.2.0",
                             "cache_tokens_left": 100, "inference_rps": 10.0, **kwargs})

    servers = {"peer-direct": record(0, 3), "peer-relay": record(3, 6, using_relay=True),
               "peer-old": record(3, 6, version="0.1.9", cache_tokens_left=0), "peer-gone": record(0, 6)}
    probes = {"peer-direct": 0.01, "peer-relay": 0.05, "peer-old": 0.01, "peer-gone": None}
    settlement = {"peer-direct": {"backend": "ledger", "account": "a", "earnings": 120, "credited": 100,
                                  "receipts_settled": 3},
                  "peer-relay": {"earnings": -1, "credited": 0, "receipts_settled": 0}}  # malformed: ignored
    model = model_status("m", ModelInfo(num_blocks=6), servers, probes, {"peer-relay": 5.0}, settlement)
    by_peer = {s.peer_id: s for s in model.servers}
    assert {p: s.reachability for p, s in by_peer.items()} == {
        "peer-direct": "direct", "peer-relay": "relay", "peer-old": "direct", "peer-gone": "unreachable"}
    assert by_peer["peer-relay"].warnings == ["behind relay: slower"]
    assert by_peer["peer-old"].warnings == ["no free cache", "old version (0.1.9)"]
    assert by_peer["peer-gone"].warnings == ["not answering"]
    assert by_peer["peer-direct"].warnings == []
    assert model.healthy and model.can_generate  # blocks 3-5: the relayed server has free cache

    state = SwarmState(updated_at=time.time(), models=[model])
    assert state.contributors == [{"peer_id": "peer-direct", "public_name": None, "backend": "ledger",
                                   "account": "a", "receipts_settled": 3, "earnings": 120, "credited": 100}]
    jsonschema.validate(state.to_json(), STATE_SCHEMA)

    relay_full = dict(servers, **{"peer-relay": record(3, 6, using_relay=True, cache_tokens_left=0)})
    blocked = model_status("m", ModelInfo(num_blocks=6), relay_full, probes)
    assert blocked.healthy and not blocked.can_generate
    assert blocked.why_not == "no reachable server with free cache for blocks 3-5"

    # three hours sampled every 30 s, with the monitor stopped for 20 minutes in the middle
    t0 = 1_700_000_000.0
    samples = [(t0 + i * 30, 4, 6, 6) for i in range(360) if not 150 <= i < 190]
    html = render_page(state, {"m": samples}, refresh_seconds=30)
    assert "can generate now" in html and 'id="contributors"' in html
    assert html.count("<polyline") == 4  # two lines, each broken once at the gap
    labels = re.findall(r'<text class="axis"[^>]*text-anchor="middle">([^<]+)</text>', html)
    assert 2 <= len(labels) <= 6 and all(re.fullmatch(r"\d\d:(00|30)", label) for label in labels), labels
