"""The health service's HTTP routes (FastAPI): the page, the JSON state and its schema, metrics, liveness."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from swarm.health.metrics import render_metrics
from swarm.health.monitor import Monitor
from swarm.health.page import render_page
from swarm.health.state import STATE_SCHEMA


def create_app(monitor: Monitor, history_hours: float = 6.0) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await monitor.start()
        yield
        await monitor.stop()
        monitor.history.close()

    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN, which a monitor's host may not reach
    app = FastAPI(title="swarm health", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return render_page(monitor.state, monitor.history.recent(history_hours),
                           refresh_seconds=max(1, round(monitor.refresh_period)))

    @app.get("/api/v1/state")
    def state() -> JSONResponse:
        return JSONResponse(monitor.state.to_json())

    @app.get("/api/v1/schema")
    def schema() -> JSONResponse:
        return JSONResponse(STATE_SCHEMA)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(render_metrics(lambda: monitor.state), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True, "last_refresh": monitor.state.updated_at}

    return app
